"""Random inputs of the gated delta rule and error measures, shared by its tests and GPU checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_gdn_inputs(
    seed: int, batch: int, seq_len: int, heads: int, k_dim: int, v_dim: int, dtype: jnp.dtype = jnp.float32,
    reset_rate: float = 0.0,
) -> dict[str, jax.Array]:
    """Layer-like inputs: q, k (B, S, H, K) L2-normalised (q scaled by K^-1/2), v (B, S, H, V) in ``dtype``;
    beta in (0, 2) and log_alpha in [-1.6, -1e-3] (B, S, H) float32; h0 (B, H, K, V) float32; reset (B, S) bool
    with about ``reset_rate`` of the positions True (None when the rate is 0)."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    inputs = {
        "q": jnp.asarray(unit((batch, seq_len, heads, k_dim)) * k_dim**-0.5, dtype),
        "k": jnp.asarray(unit((batch, seq_len, heads, k_dim)), dtype),
        "v": jnp.asarray(rng.standard_normal((batch, seq_len, heads, v_dim)), dtype),
        "beta": jnp.asarray(2.0 / (1.0 + np.exp(-rng.standard_normal((batch, seq_len, heads)))), jnp.float32),
        "log_alpha": jnp.asarray(-np.exp(rng.uniform(np.log(1e-3), np.log(1.6), (batch, seq_len, heads))),
                                 jnp.float32),
        "h0": jnp.asarray(rng.standard_normal((batch, heads, k_dim, v_dim)) * 0.1, jnp.float32),
    }
    inputs["reset"] = jnp.asarray(rng.uniform(size=(batch, seq_len)) < reset_rate) if reset_rate > 0 else None
    return inputs


def relative_error(x: jax.Array, ref: jax.Array) -> float:
    """||x - ref|| / ||ref|| in float64 on the host."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
