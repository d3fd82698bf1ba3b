"""Argument checks of the SSD op: every error names the argument, the expected and the actual value."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m2rnn_jax.checks import is_int, require


@dataclasses.dataclass(frozen=True)
class SSDShapes:
    """Sizes of one validated call: B sequences of S steps, H heads of dim P, G groups of state size N."""

    batch: int
    tokens: int
    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int


def _check_array(name: str, x: jax.Array, layout: str, expected: tuple[int, ...]) -> None:
    require(jnp.issubdtype(x.dtype, jnp.floating), name, "a floating-point array", x.dtype)
    require(tuple(x.shape) == expected, name, f"shape {layout} = {expected}", tuple(x.shape))


def validate_inputs(
    x: jax.Array,
    dt: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array | None,
    reset: jax.Array | None,
    chunk_size: int,
) -> SSDShapes:
    """Check the arguments of :func:`m2rnn_jax.ops.ssd.ssd` and return their sizes.

    Raises:
      ValueError: ``name: expected X, got Y`` for a wrong rank, shape or dtype, a group count that does not divide
        the head count, or a chunk size that is not a positive int.
    """
    require(x.ndim == 4, "x", "shape (B, S, H, P)", tuple(x.shape))
    batch, tokens, heads, head_dim = x.shape
    require(B.ndim == 4, "B", "shape (B, S, G, N)", tuple(B.shape))
    groups, state_size = B.shape[2], B.shape[3]
    _check_array("x", x, "(B, S, H, P)", tuple(x.shape))
    _check_array("dt", dt, "(B, S, H)", (batch, tokens, heads))
    _check_array("log_decay", log_decay, "(B, S, H)", (batch, tokens, heads))
    _check_array("B", B, "(B, S, G, N)", (batch, tokens, groups, state_size))
    require(heads % groups == 0, "B", f"a group count G that divides H = {heads}", groups)
    _check_array("C", C, "(B, S, G, N)", (batch, tokens, groups, state_size))
    if h0 is not None:
        _check_array("h0", h0, "(B, H, P, N)", (batch, heads, head_dim, state_size))
    if reset is not None:
        require(reset.dtype == jnp.bool_, "reset", "a bool array", reset.dtype)
        require(tuple(reset.shape) == (batch, tokens), "reset", f"shape (B, S) = {(batch, tokens)}", reset.shape)
    require(is_int(chunk_size) and chunk_size > 0, "chunk_size", "a positive int", chunk_size)
    return SSDShapes(batch, tokens, heads, head_dim, groups, state_size)
