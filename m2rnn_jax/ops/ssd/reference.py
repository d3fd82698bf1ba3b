"""The step-by-step SSD (``lax.scan`` over time): the decoding form and the reference of the chunked form."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_groups(x: jax.Array, groups: int) -> jax.Array:
    """(b, S, H, *rest) -> (b, S, G, H / G, *rest): head h belongs to group h // (H / G)."""
    return x.reshape(*x.shape[:2], groups, x.shape[2] // groups, *x.shape[3:])


def ssd_recurrent(
    x: jax.Array,
    dt: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Step-by-step SSD (no argument checks; see :func:`m2rnn_jax.ops.ssd.ssd`).

    Args:
      x: (b, S, H, P) inputs.
      dt, log_decay: (b, S, H) time steps and ``dt * A``.
      B, C: (b, S, G, N) input and output projections of the state; head h reads group h // (H / G).
      h0: (b, H, P, N) initial state.
      reset: (b, S) bool or None; the state entering a reset step is zero.

    Returns:
      y (b, S, H, P) without the D skip, and the final state (b, H, P, N).
    """
    groups = B.shape[2]
    x, dt, log_decay = (split_groups(t, groups) for t in (x, dt, log_decay))
    state = h0.reshape(h0.shape[0], groups, -1, *h0.shape[2:])  # (b, G, R, P, N)
    if reset is None:
        reset = jnp.zeros(x.shape[:2], dtype=jnp.bool_)

    def step(state, inputs):
        x_t, dt_t, a_t, B_t, C_t, reset_t = inputs  # x_t (b, G, R, P), dt_t (b, G, R), B_t (b, G, N), reset_t (b,)
        state = jnp.where(reset_t[:, None, None, None, None], 0, state)
        state = jnp.exp(a_t)[..., None, None] * state + jnp.einsum("bgrp,bgn->bgrpn", dt_t[..., None] * x_t, B_t)
        return state, jnp.einsum("bgrpn,bgn->bgrp", state, C_t)

    final, y = jax.lax.scan(step, state, [jnp.moveaxis(t, 1, 0) for t in (x, dt, log_decay, B, C, reset)])
    y = jnp.moveaxis(y, 0, 1)  # (b, S, G, R, P)
    return y.reshape(*y.shape[:2], -1, y.shape[-1]), final.reshape(h0.shape)
