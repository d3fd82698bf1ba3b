"""Small collectives over the context axis, for code running inside ``jax.shard_map`` with the sequence split into
contiguous shards: shard r of n holds positions [r S, (r + 1) S) of the global sequence (S = local length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def context_size(axis_name: str) -> int:
    """n, the number of shards of ``axis_name``; ValueError when no enclosing ``shard_map`` binds that axis."""
    if not isinstance(axis_name, str):
        raise ValueError(f"axis_name: expected a mesh axis name (str), got {axis_name!r}")
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"axis_name: expected a mesh axis bound by an enclosing jax.shard_map, got {axis_name!r} (unbound)"
        ) from None


def shift_right(x: jax.Array, axis_name: str) -> jax.Array:
    """Shard r receives shard r - 1's ``x``; shard 0 receives zeros (one ``ppermute``)."""
    n = context_size(axis_name)
    return jax.lax.ppermute(x, axis_name, [(r, r + 1) for r in range(n - 1)])


def last_shard_value(x: jax.Array, axis_name: str) -> jax.Array:
    """The value of ``x`` on the last shard, on every shard (a masked ``psum``: replicated over the axis, so it may
    leave the ``shard_map`` with an out_spec that omits ``axis_name``; its gradient reaches the last shard only,
    with ``check_vma`` on or off)."""
    n = context_size(axis_name)
    is_last = jax.lax.axis_index(axis_name) == n - 1
    return jax.lax.psum(jnp.where(is_last, x, jnp.zeros_like(x)), axis_name)


def zeros_varying_like(shape: tuple[int, ...], dtype: jnp.dtype, *references: jax.Array) -> jax.Array:
    """Zeros of ``shape`` and ``dtype`` that vary over every mesh axis one of ``references`` varies over.

    Inside a ``check_vma`` shard_map, a ``lax.scan`` carry must vary over the same axes as the carry it computes,
    so a constant start state must vary like the inputs (``lax.full_like`` keeps its reference's varying axes; the
    sum joins them). Plain zeros when ``check_vma`` is off.
    """
    return sum(jax.lax.full_like(r, 0, dtype, shape) for r in references)


def gather_shards(x: jax.Array, axis_name: str) -> jax.Array:
    """(n, ...) stack of every shard's ``x`` in shard order (``all_gather``)."""
    context_size(axis_name)
    return jax.lax.all_gather(x, axis_name)
