"""The causal depthwise short conv with the sequence split over a context axis: a halo exchange.

Output t of a causal conv of kernel_size taps reads inputs t - kernel_size + 1 .. t, so a shard needs the last
kernel_size - 1 raw inputs of the shard before it: exactly the conv state that
:class:`~m2rnn_jax.layers.conv.CausalDepthwiseConv1d` already takes. :func:`context_conv_state` builds that state
with one ``ppermute`` (shard 0 gets the given state, or zeros), and the layer's own conv then runs unchanged on each
shard (:func:`context_causal_conv`). Call both inside ``jax.shard_map`` with the sequence split into contiguous
shards over ``axis_name``. Each shard must hold at least kernel_size - 1 positions.

Documents (``segment_ids``): the layer treats its state as part of the document at position 0, so halo entries
that belong to an earlier document than the shard's first position are zeroed here; the layer's own masking does
the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from m2rnn_jax.checks import require
from m2rnn_jax.parallel.context.collectives import context_size, last_shard_value, shift_right

if TYPE_CHECKING:  # the layer package imports this package's entry points
    from m2rnn_jax.layers.conv import CausalDepthwiseConv1d


def _same_document_as_first(halo_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """(B, T) bool: halo entry j lies in the document of the shard's position 0 (no id change from j up to it)."""
    ids = jnp.concatenate([halo_ids, segment_ids[:, :1]], axis=1)  # (B, T + 1)
    changes = (ids[:, 1:] != ids[:, :-1]).astype(jnp.int32)  # (B, T): a change right after entry j
    changes_after = jnp.flip(jnp.cumsum(jnp.flip(changes, axis=1), axis=1), axis=1)
    return changes_after == 0


def context_conv_state(
    x: jax.Array,
    state: jax.Array | None = None,
    *,
    kernel_size: int,
    segment_ids: jax.Array | None = None,
    axis_name: str = "context",
) -> jax.Array:
    """The conv state this shard starts from: the last kernel_size - 1 raw inputs before it in the global sequence.

    Args:
      x: (B, S, C) local shard of the conv's raw input (S >= kernel_size - 1).
      state: (B, kernel_size - 1, C) conv state entering the GLOBAL sequence (the same on every shard), or None
        (zeros).
      kernel_size: number of taps of the conv.
      segment_ids: (B, S) local shard of the global document ids, or None.
      axis_name: the mesh axis the sequence is split over.

    Returns:
      (B, kernel_size - 1, C) in x's dtype: shard 0 gets ``state`` (or zeros), shard r the previous shard's last
      inputs, with entries of an earlier document than the shard's position 0 zeroed when ``segment_ids`` is given.

    Raises:
      ValueError naming ``kernel_size``, ``x`` (a local length below kernel_size - 1), ``state`` or ``axis_name``.
    """
    context_size(axis_name)
    require(isinstance(kernel_size, int) and kernel_size >= 1, "kernel_size", "a positive int", kernel_size)
    batch, seq_len, channels = x.shape
    tail = kernel_size - 1
    require(seq_len >= tail, "x", f"a local sequence length >= kernel_size - 1 = {tail} on each context shard", seq_len)
    expected = (batch, tail, channels)
    require(
        state is None or tuple(state.shape) == expected,
        "state",
        f"shape (B, kernel_size - 1, C) = {expected}",
        None if state is None else tuple(state.shape),
    )
    halo = shift_right(x[:, seq_len - tail :], axis_name)  # shard 0: zeros
    first = jax.lax.axis_index(axis_name) == 0
    if state is not None:
        halo = jnp.where(first, state.astype(x.dtype), halo)
    if segment_ids is not None:
        keep = _same_document_as_first(shift_right(segment_ids[:, seq_len - tail :], axis_name), segment_ids)
        halo = jnp.where((keep | first)[..., None], halo, jnp.zeros_like(halo))  # shard 0: the layer's own rule
    return halo


def context_causal_conv(
    conv: CausalDepthwiseConv1d,
    x: jax.Array,
    state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    axis_name: str = "context",
) -> tuple[jax.Array, jax.Array]:
    """``conv(x, state, segment_ids=segment_ids)`` over a sequence split into contiguous shards along ``axis_name``.

    Args:
      conv: the layer's conv module.
      x: (B, S, C) local shard; state: (B, kernel_size - 1, C) entering the global sequence, or None (zeros);
      segment_ids: (B, S) local shard of the global document ids, or None.

    Returns:
      y (B, S, C) local shard and the conv state after the whole global sequence (B, kernel_size - 1, C), the same
      on every shard, in the dtypes the layer gives them.
    """
    halo = context_conv_state(x, state, kernel_size=conv.kernel_size, segment_ids=segment_ids, axis_name=axis_name)
    y, local_state = conv(x, halo, segment_ids=segment_ids)
    new_state = last_shard_value(local_state, axis_name)
    return y, new_state if state is None else new_state.astype(state.dtype)
