"""The training configuration: one frozen, validated dataclass tree (model, optimizer, data, mesh, checkpoints).

Every field can be changed from the command line with ``--set section.field=value`` or from a YAML/JSON
``--config`` file holding the same nesting (see :mod:`m2rnn_jax.train.overrides`); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from m2rnn_jax.checks import is_int, require
from m2rnn_jax.data.config import DataConfig
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.train import overrides


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup from 0 and cosine decay to ``min_lr_ratio * learning_rate`` (SPEC §10.1).

    ``decay_steps``: None decays from the end of the warmup to the last step; an int holds the peak rate after the
    warmup and decays over the last ``decay_steps`` steps only (warmup-stable-decay: a long constant rate, e.g.
    through a curriculum, then an anneal; it must fit in ``steps - warmup_steps``).

    ``no_decay_names``: parameters whose name (last path element) is listed get no weight decay (SPEC §0.4:
    biases, norm scales, D, A_log, dt_bias); everything else (projections, conv kernels, embeddings, the M2RNN
    state weight) is decayed. ``grad_clip_norm``: global-norm clipping (None disables it).
    """

    learning_rate: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-10
    weight_decay: float = 0.1
    no_decay_names: tuple[str, ...] = ("bias", "scale", "D", "A_log", "dt_bias")
    warmup_steps: int = 2500
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    grad_clip_norm: float | None = 1.0

    def __post_init__(self):
        require(self.learning_rate > 0, "optimizer.learning_rate", "> 0", self.learning_rate)
        require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optimizer.b1/b2", "values in [0, 1)", (self.b1, self.b2))
        require(self.eps > 0, "optimizer.eps", "> 0", self.eps)
        require(self.weight_decay >= 0, "optimizer.weight_decay", ">= 0", self.weight_decay)
        require(
            is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "optimizer.warmup_steps",
            "an int >= 0",
            self.warmup_steps,
        )
        require(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "a value in [0, 1]", self.min_lr_ratio)
        require(
            self.decay_steps is None or (is_int(self.decay_steps) and self.decay_steps >= 1),
            "optimizer.decay_steps",
            "None or an int >= 1",
            self.decay_steps,
        )
        require(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            "optimizer.grad_clip_norm",
            "None or > 0",
            self.grad_clip_norm,
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, context, tensor, expert)``; one entry may be -1 = all remaining devices.

    ``data``: batch replicas; ``fsdp``: batch split + parameters sharded (ZeRO-3); ``context``: every sequence split
    into contiguous shards along time (context parallelism, :mod:`m2rnn_jax.parallel.context`; the sequence length
    must be a multiple of it); ``tensor``: heads / MLP / vocab split (M2RNN heads run without communication);
    ``expert``: MoE experts.
    """

    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = self.axis_sizes
        require(
            all(is_int(s) and (s > 0 or s == -1) for s in sizes.values()),
            "mesh",
            "positive ints (one may be -1)",
            sizes,
        )
        require(list(sizes.values()).count(-1) <= 1, "mesh", "at most one axis of size -1", sizes)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return {
            "data": self.data,
            "fsdp": self.fsdp,
            "context": self.context,
            "tensor": self.tensor,
            "expert": self.expert,
        }


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<workdir>/checkpoints``: every ``every_steps`` steps and at the end."""

    every_steps: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        require(
            is_int(self.every_steps) and self.every_steps > 0,
            "checkpoint.every_steps",
            "a positive int",
            self.every_steps,
        )
        require(is_int(self.keep) and self.keep > 0, "checkpoint.keep", "a positive int", self.keep)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Text samples printed at the end of a run on prepared text data (its tokenizer is in the workdir).

    Each of ``prompts`` is continued by up to ``max_new_tokens`` tokens, sampled at ``temperature`` within the
    nucleus ``top_p`` (temperature 0 = greedy), with the run's seed. No prompts, no samples.
    """

    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        require(all(isinstance(p, str) for p in self.prompts), "sample.prompts", "a list of strings", self.prompts)
        require(
            is_int(self.max_new_tokens) and self.max_new_tokens > 0,
            "sample.max_new_tokens",
            "a positive int",
            self.max_new_tokens,
        )
        require(self.temperature >= 0, "sample.temperature", ">= 0", self.temperature)
        require(0 < self.top_p <= 1, "sample.top_p", "a value in (0, 1]", self.top_p)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    batch_size: global sequences per optimizer step (split over ``grad_accum_steps`` micro-batches and over the
    data-parallel devices). ``eval_every``: evaluate every N steps (0 = only at the end).
    """

    model: ModelConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sample: SampleConfig = SampleConfig()
    steps: int = 1000
    batch_size: int = 64
    grad_accum_steps: int = 1
    eval_every: int = 0
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model: expected ModelConfig, got {type(self.model).__name__}")
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, name, "a positive int", value)
        require(is_int(self.eval_every) and self.eval_every >= 0, "eval_every", "an int >= 0", self.eval_every)
        require(
            self.batch_size % self.grad_accum_steps == 0,
            "batch_size",
            f"a multiple of grad_accum_steps={self.grad_accum_steps}",
            self.batch_size,
        )
        if self.data.kind == "state_tracking":
            from m2rnn_jax.data.state_tracking import get_group

            order = get_group(self.data.group).order
            require(
                self.model.vocab_size >= order,
                "model.vocab_size",
                f">= {order} (the order of group {self.data.group!r})",
                self.model.vocab_size,
            )
        require(
            self.optimizer.warmup_steps <= self.steps,
            "optimizer.warmup_steps",
            f"<= steps={self.steps}",
            self.optimizer.warmup_steps,
        )
        after_warmup = self.steps - self.optimizer.warmup_steps
        require(
            self.optimizer.decay_steps is None or self.optimizer.decay_steps <= after_warmup,
            "optimizer.decay_steps",
            f"None or <= steps - warmup_steps = {after_warmup}",
            self.optimizer.decay_steps,
        )
        lengths = sorted({self.data.seq_len, *self.data.eval_lengths, *(n for _, n in self.data.curriculum)})
        require(
            all(n % self.mesh.context == 0 for n in lengths),
            "mesh.context",
            f"a divisor of every sequence length (data.seq_len, data.curriculum, data.eval_lengths: {lengths}) "
            "since each sequence is split into mesh.context shards",
            self.mesh.context,
        )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return overrides.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return overrides.from_dict(cls, data)


def resolve_token_data(config: TrainConfig, *, keep_vocab_size: bool = False) -> TrainConfig:
    """``config`` with the facts of a prepared text directory (``data.path`` written by prepare-data) filled in.

    ``data.token_dtype`` and (if unset) ``data.eos_token_id`` come from its ``meta.json``. ``model.vocab_size``
    becomes the data's vocabulary exactly (no rounding: every logit is a real token), whatever the preset said,
    unless ``keep_vocab_size`` (set explicitly, e.g. padded to a multiple of 128 for speed): then a vocabulary
    smaller than the data's is a ValueError naming both. ``data.path=builtin:NAME`` (a corpus that ships with the
    install, :mod:`m2rnn_jax.data.builtin_corpora`) is prepared on first use and replaced by its directory. Other data
    kinds and plain token files are returned unchanged.
    """
    from m2rnn_jax.data.builtin_corpora import BUILTIN_PREFIX, prepared_builtin_corpus
    from m2rnn_jax.data.token_file import is_prepared, read_prepared

    data = config.data
    if data.kind == "token_file" and data.path.startswith(BUILTIN_PREFIX):
        path = prepared_builtin_corpus(data.path[len(BUILTIN_PREFIX) :])
        config = overrides.merge(config, {"data": {"path": str(path)}})
        data = config.data
    if data.kind != "token_file" or not is_prepared(data.path):
        return config
    prepared = read_prepared(data.path)
    if keep_vocab_size:
        require(
            config.model.vocab_size >= prepared.vocab_size,
            "model.vocab_size",
            f">= {prepared.vocab_size} (the vocabulary of data.path {data.path!r})",
            config.model.vocab_size,
        )
    changes: dict[str, Any] = {"data": {"token_dtype": prepared.dtype}}
    if data.eos_token_id is None:
        changes["data"]["eos_token_id"] = prepared.eos_token_id
    if not keep_vocab_size:
        changes["model"] = {"vocab_size": prepared.vocab_size}
    return overrides.merge(config, changes)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file (ValueError if it is not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config: expected a mapping at the top of {str(path)!r}, got {type(data).__name__}")
    return data
