"""Where batches come from: the ``data`` section of the training configuration."""

from __future__ import annotations

import dataclasses

from m2rnn_jax.checks import is_int, require
from m2rnn_jax.data.token_file import is_prepared

DATA_KINDS = ("state_tracking", "token_file", "random_tokens")
TOKEN_DTYPES = ("uint16", "uint32")
LOSS_POSITIONS = ("all", "last")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from.

    kind:
        ``state_tracking``: running products of random ``group`` elements (parity, s3, s5, a5);
        ``token_file``: windows of ``seq_len + 1`` tokens from a memory-mapped ``path``, next-token targets.
        ``path`` is a directory written by ``m2rnn-jax prepare-data`` (train on ``train.bin``, evaluate on
        ``validation.bin``; dtype and EOS id from its ``meta.json``) or one file (.bin of ``token_dtype`` or .npy;
        the last ``eval_fraction`` is held out). ``mask_documents`` starts a new document after every
        ``eos_token_id`` (default for a directory: its EOS id): every mixer starts it from a zero state and
        attention stays within it;
        ``random_tokens``: uniform random tokens (throughput runs only: nothing to learn).
    seq_len: training length; ``curriculum`` optionally starts shorter: ``((step, length), ...)`` means "from
        ``step`` on, train at ``length``" (steps ascending, first step 0, last length == ``seq_len``).
    eval_lengths: the lengths evaluated at the end (and every ``eval_every`` steps): one accuracy per length.
    eval_path: token file for evaluation (token_file only; default: validation.bin of a prepared directory, else
        the last ``eval_fraction`` of ``path``).
    eval_windows: token_file only: evaluate the first ``eval_windows`` windows of the evaluation tokens (all of
        them when there are fewer), in batches of ``eval_batch_size`` (``eval_batches`` is for the other kinds).
    loss_positions: state_tracking only: ``"all"`` trains on the running product at every position, ``"last"`` on
        the final one only (a ``loss_mask`` on the training batches; evaluation always scores every position).
    """

    kind: str = "state_tracking"
    group: str = "s3"
    seq_len: int = 64
    curriculum: tuple[tuple[int, int], ...] = ()
    eval_lengths: tuple[int, ...] = (64,)
    eval_batch_size: int = 256
    eval_batches: int = 1
    path: str | None = None
    eval_path: str | None = None
    eval_fraction: float = 0.005
    eval_windows: int = 2048
    token_dtype: str = "uint16"
    mask_documents: bool = False
    eos_token_id: int | None = None
    seed: int = 0
    loss_positions: str = "all"

    def __post_init__(self):
        require(self.kind in DATA_KINDS, "data.kind", f"one of {DATA_KINDS}", self.kind)
        require(is_int(self.seq_len) and self.seq_len > 0, "data.seq_len", "a positive int", self.seq_len)
        object.__setattr__(self, "curriculum", tuple(tuple(stage) for stage in self.curriculum))
        if self.curriculum:
            steps = [stage[0] for stage in self.curriculum]
            require(
                all(len(stage) == 2 for stage in self.curriculum),
                "data.curriculum",
                "pairs (step, length)",
                self.curriculum,
            )
            require(
                steps[0] == 0 and steps == sorted(set(steps)),
                "data.curriculum",
                "strictly increasing steps starting at 0",
                self.curriculum,
            )
            require(
                self.curriculum[-1][1] == self.seq_len,
                "data.curriculum",
                f"a last length equal to data.seq_len={self.seq_len}",
                self.curriculum,
            )
        require(
            len(self.eval_lengths) > 0 and all(is_int(n) and n > 0 for n in self.eval_lengths),
            "data.eval_lengths",
            "a non-empty list of positive ints",
            self.eval_lengths,
        )
        require(
            is_int(self.eval_batch_size) and self.eval_batch_size > 0,
            "data.eval_batch_size",
            "a positive int",
            self.eval_batch_size,
        )
        require(
            is_int(self.eval_batches) and self.eval_batches > 0,
            "data.eval_batches",
            "a positive int",
            self.eval_batches,
        )
        require(self.token_dtype in TOKEN_DTYPES, "data.token_dtype", f"one of {TOKEN_DTYPES}", self.token_dtype)
        require(0 < self.eval_fraction < 1, "data.eval_fraction", "a value in (0, 1)", self.eval_fraction)
        require(
            is_int(self.eval_windows) and self.eval_windows > 0,
            "data.eval_windows",
            "a positive int",
            self.eval_windows,
        )
        if self.kind == "token_file":
            require(
                bool(self.path),
                "data.path",
                "a token file (.bin or .npy) or a prepare-data directory for kind=token_file",
                self.path,
            )
        require(
            self.loss_positions in LOSS_POSITIONS,
            "data.loss_positions",
            f"one of {LOSS_POSITIONS}",
            self.loss_positions,
        )
        require(
            self.loss_positions == "all" or self.kind == "state_tracking",
            "data.loss_positions",
            "'all' unless data.kind=state_tracking",
            (self.loss_positions, self.kind),
        )
        if self.mask_documents:
            require(
                self.kind == "token_file" and (self.eos_token_id is not None or is_prepared(self.path)),
                "data.mask_documents",
                "kind=token_file with data.eos_token_id set (or a prepared directory)",
                (self.kind, self.eos_token_id),
            )

    def seq_len_at(self, step: int) -> int:
        """The training length at ``step`` (the curriculum stage that covers it, else ``seq_len``)."""
        length = self.seq_len
        for start, stage_length in self.curriculum:
            if step >= start:
                length = stage_length
        return length
