"""Opt-in value checks of the M2RNN op's inputs (``m2rnn(..., check_values=True)`` or ``M2RNN_JAX_CHECKS=1``).

The shape and dtype checks of :mod:`m2rnn_jax.ops.m2rnn.validation` run while tracing; these look at values, which
under ``jax.jit`` exist only when the program runs (:mod:`m2rnn_jax.value_checks` says where a failure surfaces).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.value_checks import require_finite, require_values, run_checks


def _input_checks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    cu_seqlens: jax.Array | None,
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("W", W)):
        require_finite(name, x)
    require_values("f", (f > 0) & (f <= 1), f, "values in (0, 1]")  # NaN fails too
    if h0 is not None:
        require_finite("h0", h0)
    if cu_seqlens is not None:
        tokens, position = q.shape[0], jnp.arange(cu_seqlens.shape[0])
        first_ok = (position != 0) | (cu_seqlens == 0)
        require_values("cu_seqlens", first_ok, cu_seqlens, "0 first")
        last_ok = (position != cu_seqlens.shape[0] - 1) | (cu_seqlens == tokens)
        require_values("cu_seqlens", last_ok, cu_seqlens, f"the number of packed tokens T = {tokens} last")
        rising = jnp.concatenate([jnp.ones((1,), jnp.bool_), cu_seqlens[1:] >= cu_seqlens[:-1]])
        require_values("cu_seqlens", rising, cu_seqlens, "non-decreasing offsets")


def check_input_values(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    cu_seqlens: jax.Array | None,
) -> None:
    """Check the values of validated op inputs: f in (0, 1]; q, k, v, W, h0 finite; ``cu_seqlens`` 0 first,
    non-decreasing and T last. Each failure names the argument, the offending value and its index."""
    run_checks(_input_checks, q, k, v, W, f, h0, cu_seqlens)
