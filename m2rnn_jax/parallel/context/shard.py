"""Opening the ``jax.shard_map`` over the context axis: a function of local sequence shards run on global arrays.

Every argument and result has a kind: :data:`SEQUENCE` (B, S, ...) split over the batch mesh axes and along S over
the context axis, :data:`BATCH` (B, ...) split over the batch axes and the same on every context shard (an initial
or final state), :data:`REPLICATED` (weights: whole on every device). The batch is split over the batch axes
(data, fsdp, expert) only where it divides them; axes that are not split stay automatic (the ``tensor`` axis, for
one: XLA, or an op's own ``shard_map``, handles it inside). Arguments may be pytrees (and None).

The gradient of a BATCH or REPLICATED argument is summed over the context shards (a ``psum``); bfloat16 / float16
arguments of those kinds enter the ``shard_map`` as float32 and are cast back inside, so that sum runs in float32
(more accurate, and XLA:CPU fails to compile a bfloat16 all-reduce inside ``shard_map``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m2rnn_jax.parallel.axes import auto_axis_sizes, batch_split_axes, spec_entry
from m2rnn_jax.parallel.context.axis import CONTEXT_AXIS

SEQUENCE, BATCH, REPLICATED = "sequence", "batch", "replicated"


def require_divisible_sequence(seq_len: int, axis_name: str = CONTEXT_AXIS) -> int:
    """The number of context shards; ValueError naming both when ``seq_len`` is not a multiple of it."""
    shards = auto_axis_sizes().get(axis_name, 1)
    if seq_len % shards != 0:
        raise ValueError(
            f"sequence length: expected a multiple of the context axis size {shards} (mesh axis {axis_name!r}), "
            f"got {seq_len}"
        )
    return shards


def run_over_context(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kinds: Sequence[str],
    out_kinds: Sequence[str],
    *,
    axis_name: str = CONTEXT_AXIS,
) -> Any:
    """``fn(*local_args)`` inside ``jax.shard_map`` over ``axis_name`` and the batch axes; returns the global results.

    kinds / out_kinds: one of SEQUENCE, BATCH, REPLICATED per argument / per result (``fn`` returns a tuple of
    ``len(out_kinds)``). The first SEQUENCE argument gives B and S; S must be a multiple of the context size.
    BATCH results must be the same on every context shard (``fn``'s responsibility).
    """
    sequence = next(a for a, kind in zip(args, kinds, strict=True) if kind == SEQUENCE and a is not None)
    leaf = jax.tree.leaves(sequence)[0]
    require_divisible_sequence(leaf.shape[1], axis_name)
    batch_axes = batch_split_axes(auto_axis_sizes(), leaf.shape[0])
    b = spec_entry(batch_axes)
    specs = {SEQUENCE: P(b, axis_name), BATCH: P(b), REPLICATED: P()}
    for kind in (*kinds, *out_kinds):
        if kind not in specs:
            raise ValueError(f"kind: expected one of {sorted(specs)}, got {kind!r}")
    dtypes = [jax.tree.map(lambda x: x.dtype, a) for a in args]
    args = [a if kind == SEQUENCE else jax.tree.map(_widen, a) for a, kind in zip(args, kinds)]

    def local(*args):
        return fn(*(jax.tree.map(lambda x, dtype: x.astype(dtype), a, d) for a, d in zip(args, dtypes)))

    return jax.shard_map(
        local,
        in_specs=tuple(specs[kind] for kind in kinds),
        out_specs=tuple(specs[kind] for kind in out_kinds),
        axis_names={axis_name, *batch_axes},
        check_vma=False,
    )(*args)


def _widen(x: jax.Array) -> jax.Array:
    """float32 for a 16-bit float array (its cotangent is summed over the shards), ``x`` otherwise."""
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32 else x
