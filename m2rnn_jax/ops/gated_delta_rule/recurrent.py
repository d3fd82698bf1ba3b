"""The gated delta rule step by step (``lax.scan`` over time): the plainest form, used for decoding and checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gated_delta_rule_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per head, walking t = 0 .. S-1 with state S_prev (K, V):

        S_prev <- 0 if reset_t;  S <- exp(log_alpha_t) S_prev;  w_t = beta_t (v_t - S^T k_t);
        S <- S + k_t w_t^T;  o_t = S^T q_t

    Args:
      q, k (B, S, H, K), v (B, S, H, V), beta, log_alpha (B, S, H), h0 (B, H, K, V) in the compute dtype
      (the caller casts); reset (B, S) bool or None.

    Returns:
      o (B, S, H, V) and the final state (B, H, K, V), in the dtype of the inputs.
    """
    if reset is None:
        reset = jnp.zeros(q.shape[:2], dtype=jnp.bool_)

    def step(state, inputs):
        q_t, k_t, v_t, beta_t, log_alpha_t, reset_t = inputs
        state = jnp.where(reset_t[:, None, None, None], jnp.zeros_like(state), state)
        state = jnp.exp(log_alpha_t)[..., None, None] * state
        w = beta_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + k_t[..., :, None] * w[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_alpha, reset)]
    final, o = jax.lax.scan(step, h0, time_major)
    return jnp.moveaxis(o, 0, 1), final
