"""Head broadcasting (SPEC §0.3 / §2.4): output head n reads source head n // (N / N_x), and its adjoint.

Plain ``jnp`` on arrays, at the bottom of the package so that the kernels' wrappers and the ops
(:mod:`m2rnn_jax.ops.heads` re-exports these) share one definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expand_heads(x: jax.Array, num_heads: int, axis: int) -> jax.Array:
    """Repeat each source head of ``x`` along ``axis`` in contiguous blocks so that it has ``num_heads`` heads.

    ``x`` has ``N_x`` heads on ``axis`` with ``num_heads % N_x == 0``; the result has ``num_heads`` heads and
    head ``n`` equals source head ``n // (num_heads // N_x)`` (``repeat_interleave`` semantics).
    """
    source_heads = x.shape[axis]
    if source_heads == num_heads:
        return x
    return jnp.repeat(x, num_heads // source_heads, axis=axis)


def reduce_heads(x: jax.Array, source_heads: int, axis: int) -> jax.Array:
    """Adjoint of :func:`expand_heads`: sum each contiguous block of ``N // source_heads`` heads on ``axis``.

    Used by kernel backends that emit per-output-head partial gradients for broadcast inputs.
    """
    num_heads = x.shape[axis]
    if source_heads == num_heads:
        return x
    axis = axis % x.ndim
    grouped = x.reshape(x.shape[:axis] + (source_heads, num_heads // source_heads) + x.shape[axis + 1 :])
    return grouped.sum(axis=axis + 1)
