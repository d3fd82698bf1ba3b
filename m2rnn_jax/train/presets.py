"""Training presets: a model plus its data, optimizer and schedule, by name.

``state-tracking-<group>-tiny`` (group = parity, s3, s5, a5) train a small M2RNN on CPU at length 64 and
evaluate at 64, 256 and 1024 (the README quick start); ``state-tracking-<group>-small`` is the same task with a
bigger model and batch for a GPU; ``state-tracking-<group>-large`` the setting for A5 and S5 (wider, longer, a
slower curriculum). The model part of every training preset is also registered with
:func:`m2rnn_jax.models.register_preset`, so ``m2rnn-jax info --list`` shows them. Any model preset can be
trained too (:func:`train_config`): it gets :func:`default_train_config` (random tokens, for throughput runs).

The CLI looks every preset up here: importing this module registers the training presets, and it re-exports the
model registry's lookups (:func:`list_presets`, :func:`get_preset`, :func:`preset_description`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable

from m2rnn_jax.data.state_tracking import GROUPS, get_group
from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.layers.m2rnn import M2RNNConfig
from m2rnn_jax.layers.mlp import MLPConfig
from m2rnn_jax.models import ModelConfig, get_preset, list_presets, preset_description, register_preset
from m2rnn_jax.train.config import CheckpointConfig, DataConfig, OptimizerConfig, SampleConfig, TrainConfig

__all__ = [
    "default_train_config",
    "get_preset",
    "list_presets",
    "list_train_presets",
    "preset_description",
    "register_train_preset",
    "state_tracking_model",
    "train_config",
]


@dataclasses.dataclass(frozen=True)
class TrainPreset:
    name: str
    description: str
    factory: Callable[[], TrainConfig]


_TRAIN_PRESETS: dict[str, TrainPreset] = {}


def register_train_preset(name: str, factory: Callable[[], TrainConfig], description: str) -> None:
    """Adds a training preset and registers its model config as a model preset of the same name."""
    if name in _TRAIN_PRESETS:
        raise ValueError(f"name: a training preset named {name!r} is already registered")
    _TRAIN_PRESETS[name] = TrainPreset(name, description, factory)
    register_preset(name, lambda: factory().model, f"{description} [training preset]")


def list_train_presets() -> list[str]:
    return list(_TRAIN_PRESETS)


def default_train_config(model: ModelConfig) -> TrainConfig:
    """A short run on random tokens (seq_len 128, batch 16, 100 steps): for throughput and smoke tests."""
    return TrainConfig(
        model=model,
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
        data=DataConfig(kind="random_tokens", seq_len=128, eval_lengths=(128,), eval_batch_size=16),
        checkpoint=CheckpointConfig(every_steps=100),
        steps=100,
        batch_size=16,
        log_every=10,
    )


def train_config(name: str) -> TrainConfig:
    """The training config of preset ``name``: a training preset, or a model preset with the default settings."""
    if name in _TRAIN_PRESETS:
        return _TRAIN_PRESETS[name].factory()
    if name in list_presets():
        return default_train_config(get_preset(name))
    names = list(_TRAIN_PRESETS) + [n for n in list_presets() if n not in _TRAIN_PRESETS]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `m2rnn-jax info --list` lists them"
    raise ValueError(f"--preset: unknown preset {name!r}{hint}")


def state_tracking_model(
    group: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    k_head_dim: int,
    v_head_dim: int,
    intermediate_size: int,
    dtype: str = "float32",
    initializer_range: float = 0.2,
) -> ModelConfig:
    """An all-M2RNN decoder whose vocabulary is the group's elements (input tokens and output classes).

    Choices that differ from the language-model layer, each of which made S3 learn faster in the sweep recorded
    in experiments/RESULTS.md: no short conv (with a 4-tap conv the first positions are solvable without the
    recurrence, a shortcut that stalls learning); a decay gate that starts with short memory (f = exp(-A dt)
    mostly well below 1: dt in [0.3, 3], A in [1, 16]), since every step must overwrite the state; a 10x larger
    init (``initializer_range`` 0.2), so k v^T is O(1) from the start and the tanh is used, not its linear part;
    a random state weight W ~ N(0, 1.6 / sqrt(V)) (0.2 at V=64, spectral radius ~1.6 at any V) instead of the
    identity: the units of a row mix from the first step, which composing permutations needs (S3 learned in ~1.4-2x
    fewer steps on the CPU recipes, experiments/state_tracking/SEARCH.md).
    Each row of a head's state is a V-unit tanh RNN, so V, not K, is the capacity that state tracking needs.
    """
    return ModelConfig(
        vocab_size=get_group(group).order,
        hidden_size=hidden_size,
        num_layers=num_layers,
        layer_pattern="M" * num_layers,
        mlp=MLPConfig(intermediate_size=intermediate_size),
        initializer_range=initializer_range,
        m2rnn=M2RNNConfig(
            num_heads=num_heads,
            k_head_dim=k_head_dim,
            v_head_dim=v_head_dim,
            num_q_heads=num_heads,
            num_k_heads=num_heads,
            kernel_size=None,
            activation_function=None,
            A_init_min=1.0,
            A_init_max=16.0,
            dt_init_min=0.3,
            dt_init_max=3.0,
            state_weight_init_std=1.6 / math.sqrt(v_head_dim),
        ),
        dtype=dtype,
    )


def _state_tracking_tiny(group: str) -> TrainConfig:
    return TrainConfig(
        model=state_tracking_model(
            group, hidden_size=64, num_layers=2, num_heads=4, k_head_dim=2, v_head_dim=64, intermediate_size=128
        ),
        optimizer=OptimizerConfig(learning_rate=5e-3, warmup_steps=100, weight_decay=0.1),
        data=DataConfig(
            kind="state_tracking",
            group=group,
            seq_len=64,
            curriculum=((0, 16), (2000, 64)),
            eval_lengths=(64, 256, 1024),
            eval_batch_size=256,
        ),
        checkpoint=CheckpointConfig(every_steps=1000, keep=2),
        steps=3000,
        batch_size=32,
        log_every=100,
    )


def _state_tracking_small(group: str) -> TrainConfig:
    """The tiny recipe scaled up for a GPU (wider V-rich heads, 4 layers, training length 128), in float32: in
    bfloat16 S3 stopped at 99.4% even at the training length (H200, session 5)."""
    return TrainConfig(
        model=state_tracking_model(
            group, hidden_size=256, num_layers=4, num_heads=8, k_head_dim=4, v_head_dim=64, intermediate_size=512
        ),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=200, weight_decay=0.1),
        data=DataConfig(
            kind="state_tracking",
            group=group,
            seq_len=128,
            curriculum=((0, 32), (2000, 128)),
            eval_lengths=(128, 512, 2048),
            eval_batch_size=512,
        ),
        checkpoint=CheckpointConfig(every_steps=1000, keep=2),
        steps=6000,
        batch_size=128,
        log_every=100,
    )


def _permutation_block_width(group: str) -> int:
    """V for a group of permutations of n items: n |G| rounded up to a multiple of 64 (64 for parity).

    Why: a row of an M2RNN state is a tanh RNN of width V with an input-independent W, and the K rows share W
    and the input. One way for it to compose permutations: a block of n units per input element a; at step t only
    the block of x_t is on (v_t holds the others saturated off), and in it row i of the state holds row i of the
    running product's permutation matrix; W adds up the blocks (one is on) and applies a's permutation into block
    a, for every a. That needs V >= n |G| and K >= n - 1 rows (the last row of a permutation matrix follows from
    the others): S3 18 (the S3 sweep learned with V=64, K=2 and failed with V=16), A5 300, S5 600.
    """
    order = get_group(group).order
    items = {"s3": 3, "a5": 5, "s5": 5}.get(group, 1)
    return max(64, -(-items * order // 64) * 64)


def _state_tracking_large(group: str) -> TrainConfig:
    """For the large groups (A5, S5) on a GPU: 4 heads of K=4 rows x V = :func:`_permutation_block_width` (the
    scan backend: V is larger than the fused kernels' tiles), a learned query, a batch of 256 and a slow curriculum
    from length 4 (where the model must first learn the group's multiplication table) to 64 in four stages (each new
    length is one more compile), a constant lr 1e-3 after warmup and a cosine anneal to 1e-4 over the last 1000
    steps (at 64), evaluated to 16x. The search behind it is in experiments/state_tracking/SEARCH.md:

    * the query is ``"learned"`` (one (Nq, K) query for every token): with the token's own query the decoder stayed
      on the two-element lookup plateau of A5 for 2.6M sequences (row 15); with the learned query and nothing else
      changed it left it after ~1.6M sequences of length 4 and was exact at its training length (row 23);
    * the rate stays at 1e-3 through the plateau and the curriculum: with a cosine-decayed rate the op alone stayed
      on the plateau (rows 11, 13); and it is annealed at the end: the recurrence alone, trained at 64 with a
      constant 1e-3, kept a loss of 0.02-0.05; annealed, the loss fell to 0.0005 within ~550 steps and the accuracy
      at 2x / 4x its training length rose from 65 / 32% to 96 / 69% (rows 33-35, CPU; the anneal is not yet
      measured on this preset);
    * the stages, in row 23's sequences (batch 128 there, 256 here): length 4 until 2.56M sequences (10000 steps;
      row 23 was at 99.2% at 1.98M and 99.8% at 2.56M, when it moved on), 8 for 0.77M (3000 steps; row 23 was exact
      after ~0.33M), 16 for 0.26M (1000 steps; row 23: 99.88% after 0.26M), then 64 for 0.5M (2000 steps; 256 is its
      4x). The short stages at 8 and 16 leave time for 64: a step costs ~1.9 ms per position for A5 with the GPU
      to itself (3.8 ms measured on an H200 with S5 training beside it, ~4x that for S5: V^2), so A5 alone
      should reach 64 after ~3 minutes of a 7-minute H200 call (experiments/results/h200_2026-12-04_session13/
      st_large_rates).
    """
    model = state_tracking_model(
        group,
        hidden_size=256,
        num_layers=2,
        num_heads=4,
        k_head_dim=4,
        v_head_dim=_permutation_block_width(group),
        intermediate_size=1024,
    )
    return TrainConfig(
        model=model.replace(m2rnn=dataclasses.replace(model.m2rnn, backend="scan", query="learned")),
        optimizer=OptimizerConfig(
            learning_rate=1e-3, warmup_steps=500, weight_decay=0.1, min_lr_ratio=0.1, decay_steps=1000
        ),
        data=DataConfig(
            kind="state_tracking",
            group=group,
            seq_len=64,
            curriculum=((0, 4), (10000, 8), (13000, 16), (14000, 64)),
            eval_lengths=(64, 256, 1024),
            eval_batch_size=128,
            eval_batches=4,
        ),
        checkpoint=CheckpointConfig(every_steps=2000, keep=1),
        steps=16000,
        batch_size=256,
        log_every=200,
    )


TEXT_DEMO_PROMPTS = ('The "while" statement', "A class definition")


def _text_demo() -> TrainConfig:
    """A small M2RNN + attention hybrid (MMAM, h=128, ~1.9M parameters) on the Python reference topics that ship
    with Python (``builtin:python-docs``: 105k training tokens, BPE 4096): a few CPU minutes, validation perplexity
    every 50 steps, two sampled continuations at the end."""
    model = ModelConfig(
        vocab_size=4096,
        hidden_size=128,
        num_layers=4,
        layer_pattern="MMAM",
        mlp=MLPConfig(intermediate_size=384),
        m2rnn=M2RNNConfig(num_heads=8, k_head_dim=32, v_head_dim=16),
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=32),
    )
    return TrainConfig(
        model=model,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30),
        data=DataConfig(
            kind="token_file",
            path="builtin:python-docs",
            seq_len=128,
            eval_lengths=(128,),
            eval_batch_size=32,
            eval_windows=64,
        ),
        checkpoint=CheckpointConfig(every_steps=200, keep=1),
        sample=SampleConfig(prompts=TEXT_DEMO_PROMPTS, max_new_tokens=48),
        steps=200,
        batch_size=16,
        log_every=25,
        eval_every=50,
    )


def _register() -> None:
    register_train_preset(
        "text-demo",
        _text_demo,
        "real text on CPU: MMAM hybrid (h=128) on Python's bundled reference docs, perplexity + samples, minutes",
    )
    for group in GROUPS:
        label = "parity" if group == "parity" else group.upper()
        register_train_preset(
            f"state-tracking-{group}-tiny",
            lambda group=group: _state_tracking_tiny(group),
            f"{label} state tracking: 2-layer M2RNN (h=64), train 16 -> 64, eval at 64/256/1024, CPU minutes",
        )
        register_train_preset(
            f"state-tracking-{group}-small",
            lambda group=group: _state_tracking_small(group),
            f"{label} state tracking: 4-layer M2RNN (h=256), train 32 -> 128, eval up to 2048, for a GPU",
        )
        register_train_preset(
            f"state-tracking-{group}-large",
            lambda group=group: _state_tracking_large(group),
            f"{label} state tracking: 2-layer M2RNN (h=256, 4 heads of K=4 x V=n|G|, learned query), batch 256, "
            "train 4 -> 64, eval to 1024, for a GPU (A5 / S5)",
        )


_register()
