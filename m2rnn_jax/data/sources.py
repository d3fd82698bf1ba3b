"""Batch sources: every batch is a pure function of (step, length, rows), so resuming needs only the step.

``train_batch(step, seq_len, batch_size, rows)`` returns rows ``rows`` of global training batch ``step``;
``eval_batch(index, seq_len, batch_size, rows)`` the same for batch ``index`` of the fixed evaluation set at that
length, which has ``num_eval_batches(seq_len, batch_size)`` batches. Arrays are numpy int32 (B_rows, S):
``inputs``, ``targets`` and optionally ``segment_ids`` and ``loss_mask``. ``token_bytes`` is (vocab,) UTF-8 bytes
per token id when the tokenizer is known (bits per byte), else None.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from m2rnn_jax.data.config import DataConfig
from m2rnn_jax.data.state_tracking import get_group, state_tracking_batch
from m2rnn_jax.data.token_file import TokenWindows, is_prepared, open_tokens, read_prepared
from m2rnn_jax.data.tokenizer import load_tokenizer

Batch = dict[str, np.ndarray]
EVAL_STREAM = 1_000_003  # added to the seed for evaluation data, so it never repeats a training batch


class BatchSource(Protocol):
    token_bytes: np.ndarray | None

    def train_batch(self, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch: ...

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch: ...

    def num_eval_batches(self, seq_len: int, batch_size: int) -> int: ...


class _FixedEvalBatches:
    """``data.eval_batches`` evaluation batches at every length; no tokenizer."""

    token_bytes = None

    def __init__(self, config: DataConfig):
        self.eval_batches = config.eval_batches

    def num_eval_batches(self, seq_len: int, batch_size: int) -> int:
        return self.eval_batches


class StateTrackingSource(_FixedEvalBatches):
    """Random group-element sequences and their running products (train and eval from disjoint seeds); with
    ``loss_positions="last"`` the training batches carry a ``loss_mask`` of the final position."""

    def __init__(self, config: DataConfig):
        super().__init__(config)
        self.group = get_group(config.group)
        self.seed = config.seed
        self.last_position_only = config.loss_positions == "last"

    def train_batch(self, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        batch = state_tracking_batch(
            self.group, seed=self.seed, step=step, batch_size=batch_size, seq_len=seq_len, rows=rows
        )
        if self.last_position_only:  # data.loss_positions="last": only the whole sequence's product counts
            batch["loss_mask"] = np.zeros_like(batch["targets"])
            batch["loss_mask"][:, -1] = 1
        return batch

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        return state_tracking_batch(
            self.group,
            seed=self.seed + EVAL_STREAM,
            step=seq_len * 10_000 + index,
            batch_size=batch_size,
            seq_len=seq_len,
            rows=rows,
        )


class RandomTokenSource(_FixedEvalBatches):
    """Uniform random tokens with next-token targets: for throughput measurements (there is nothing to learn)."""

    def __init__(self, config: DataConfig, vocab_size: int):
        super().__init__(config)
        self.seed, self.vocab_size = config.seed, vocab_size

    def _batch(self, seed: int, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        tokens = rng.integers(0, self.vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)[rows]
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def train_batch(self, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        return self._batch(self.seed, step, seq_len, batch_size, rows)

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        return self._batch(self.seed + EVAL_STREAM, index, seq_len, batch_size, rows)


class TokenFileSource:
    """Windows of packed token files: shuffled per epoch for training; for evaluation the first
    ``data.eval_windows`` windows in order (rows past the last window repeat window 0 with ``loss_mask`` 0)."""

    def __init__(self, config: DataConfig, vocab_size: int):
        self.seed, self.config, self.vocab_size = config.seed, config, vocab_size
        eos = config.eos_token_id
        self.token_bytes = None
        if is_prepared(config.path):
            prepared = read_prepared(config.path)
            if prepared.vocab_size > vocab_size:
                raise ValueError(
                    f"model.vocab_size: expected >= {prepared.vocab_size} (the vocabulary of data.path "
                    f"{config.path!r}), got {vocab_size}"
                )
            tokens = open_tokens(prepared.train_file, prepared.dtype)
            eval_tokens = open_tokens(prepared.validation_file, prepared.dtype)
            eos = prepared.eos_token_id if eos is None else eos
            self.token_bytes = load_tokenizer(prepared.directory).token_byte_lengths()
        else:
            tokens = eval_tokens = open_tokens(config.path, config.token_dtype)
        if config.eval_path is not None:
            eval_tokens = open_tokens(config.eval_path, config.token_dtype)
        self.train_tokens, self.eval_tokens = tokens, eval_tokens
        self.train_end, self.eval_begin = len(tokens), 0
        if eval_tokens is tokens:
            self.train_end = self.eval_begin = int(len(tokens) * (1 - config.eval_fraction))
        self._eos = eos if config.mask_documents else None
        self._windows: dict[tuple[str, int], TokenWindows] = {}

    def _get(self, split: str, seq_len: int) -> TokenWindows:
        key = (split, seq_len)
        if key not in self._windows:
            if split == "train":
                windows = TokenWindows(self.train_tokens, seq_len, end=self.train_end, eos_token_id=self._eos)
            else:
                windows = TokenWindows(self.eval_tokens, seq_len, begin=self.eval_begin, eos_token_id=self._eos)
            self._windows[key] = windows
        return self._windows[key]

    def _check_vocab(self, batch: Batch) -> Batch:
        top = int(max(batch["inputs"].max(initial=0), batch["targets"].max(initial=0)))
        if top >= self.vocab_size:
            raise ValueError(f"data.path: token id {top} is >= model.vocab_size={self.vocab_size}")
        return batch

    def train_batch(self, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        start, stop, _ = rows.indices(batch_size)
        batch = self._get("train", seq_len).shuffled(self.seed, step * batch_size + start, stop - start)
        return self._check_vocab(batch)

    def _num_eval_windows(self, seq_len: int) -> int:
        return min(self.config.eval_windows, self._get("eval", seq_len).num_windows)

    def num_eval_batches(self, seq_len: int, batch_size: int) -> int:
        return -(-self._num_eval_windows(seq_len) // batch_size)

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        start, stop, _ = rows.indices(batch_size)
        indices = index * batch_size + np.arange(start, stop)
        valid = indices < self._num_eval_windows(seq_len)
        batch = self._get("eval", seq_len).windows(np.where(valid, indices, 0))
        batch["loss_mask"] = np.broadcast_to(valid[:, None], batch["targets"].shape).astype(np.int32)
        return self._check_vocab(batch)


def make_source(config: DataConfig, vocab_size: int) -> BatchSource:
    """The batch source that ``config.kind`` names."""
    if config.kind == "state_tracking":
        return StateTrackingSource(config)
    if config.kind == "random_tokens":
        return RandomTokenSource(config, vocab_size)
    return TokenFileSource(config, vocab_size)
