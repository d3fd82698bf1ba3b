"""Batch sources: every batch is a pure function of (step, length, rows), so resuming needs only the step.

``train_batch(step, seq_len, batch_size, rows)`` returns rows ``rows`` of global training batch ``step``;
``eval_batch(index, seq_len, batch_size, rows)`` the same for the fixed evaluation set at that length. Arrays are
numpy int32 (B_rows, S): ``inputs``, ``targets`` and optionally ``segment_ids``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from m2rnn_jax.data.config import DataConfig
from m2rnn_jax.data.state_tracking import get_group, state_tracking_batch
from m2rnn_jax.data.token_file import TokenWindows, open_tokens

Batch = dict[str, np.ndarray]
EVAL_STREAM = 1_000_003  # added to the seed for evaluation data, so it never repeats a training batch


class BatchSource(Protocol):
    def train_batch(self, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch: ...

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch: ...


class StateTrackingSource:
    """Random group-element sequences and their running products (train and eval from disjoint seeds)."""

    def __init__(self, config: DataConfig):
        self.group = get_group(config.group)
        self.seed = config.seed

    def train_batch(self, step: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        return state_tracking_batch(self.group, seed=self.seed, step=step, batch_size=batch_size,
                                    seq_len=seq_len, rows=rows)

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        return state_tracking_batch(self.group, seed=self.seed + EVAL_STREAM, step=seq_len * 10_000 + index,
                                    batch_size=batch_size, seq_len=seq_len, rows=rows)


class RandomTokenSource:
    """Uniform random tokens with next-token targets: for throughput measurements (there is nothing to learn)."""

    def __init__(self, config: DataConfig, vocab_size: int):
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
    """Windows of a packed token file (shuffled per epoch for training, in order for evaluation)."""

    def __init__(self, config: DataConfig, vocab_size: int):
        tokens = open_tokens(config.path, config.token_dtype)
        self.seed, self.config, self.vocab_size = config.seed, config, vocab_size
        eos = config.eos_token_id if config.mask_documents else None
        if config.eval_path is not None:
            self.train_tokens, self.eval_tokens = tokens, open_tokens(config.eval_path, config.token_dtype)
            self.train_end, self.eval_begin = len(tokens), 0
        else:
            split = int(len(tokens) * (1 - config.eval_fraction))
            self.train_tokens = self.eval_tokens = tokens
            self.train_end, self.eval_begin = split, split
        self._eos = eos
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

    def eval_batch(self, index: int, seq_len: int, batch_size: int, rows: slice) -> Batch:
        windows = self._get("eval", seq_len)
        start, stop, _ = rows.indices(batch_size)
        indices = (index * batch_size + np.arange(start, stop)) % windows.num_windows
        return self._check_vocab(windows.windows(indices))


def make_source(config: DataConfig, vocab_size: int) -> BatchSource:
    """The batch source that ``config.kind`` names."""
    if config.kind == "state_tracking":
        return StateTrackingSource(config)
    if config.kind == "random_tokens":
        return RandomTokenSource(config, vocab_size)
    return TokenFileSource(config, vocab_size)
