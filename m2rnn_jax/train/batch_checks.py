"""Opt-in value checks of a training or evaluation batch (``M2RNN_JAX_CHECKS=1``), run inside the jitted steps.

A token id past the vocabulary does not fail under ``jax.jit``: the embedding lookup fills its row with NaN and the
loss reads a wrong (NaN or clamped) log-probability for an out-of-range target. With the checks on,
:func:`check_batch` fails on the first bad value instead, naming the batch key, the value and its (row, position)
index (:mod:`m2rnn_jax.value_checks` says where the error surfaces).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from m2rnn_jax.value_checks import checks_enabled, require_values, run_checks

TOKEN_KEYS = ("inputs", "targets")


def _batch_checks(batch: Mapping[str, jax.Array], vocab_size: int) -> None:
    for key in TOKEN_KEYS:
        ids = batch[key]
        require_values(key, (ids >= 0) & (ids < vocab_size), ids, f"token ids in [0, {vocab_size})")
    segment_ids = batch.get("segment_ids")
    if segment_ids is not None:
        require_values("segment_ids", segment_ids >= 0, segment_ids, "non-negative document ids")
        rising = segment_ids[:, 1:] >= segment_ids[:, :-1]
        rising = jnp.concatenate([jnp.ones_like(rising[:, :1]), rising], axis=1)
        require_values("segment_ids", rising, segment_ids, "document ids non-decreasing along each row")


def check_batch(batch: Mapping[str, jax.Array], vocab_size: int, check_values: bool | None = None) -> None:
    """Check a batch's values when enabled (``check_values``, or ``M2RNN_JAX_CHECKS`` when None; a no-op otherwise).

    batch: ``inputs`` and ``targets`` (B, S) token ids, optionally ``segment_ids`` (B, S). Checked: every token id
    in [0, vocab_size); segment ids non-negative and non-decreasing along each row (documents numbered in order,
    as every data source of :mod:`m2rnn_jax.data` writes them).
    """
    if checks_enabled(check_values):
        present = {key: batch[key] for key in (*TOKEN_KEYS, "segment_ids") if key in batch}
        run_checks(functools.partial(_batch_checks, vocab_size=vocab_size), present)
