"""Rotary position embedding over the full head dimension (SPEC §9.1: RoPE θ = 10000 for the pure-attention baseline).

Rotate-half convention (as lm-engine / HF Llama): the head vector is split into halves ``x1 = x[..., :d/2]``,
``x2 = x[..., d/2:]`` and pair i = (x1[i], x2[i]) is rotated by the angle ``position * theta**(-2i/d)``:
``(x1 cos - x2 sin, x2 cos + x1 sin)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(head_dim: int, theta: float, dtype=jnp.float32) -> jax.Array:
    """(head_dim // 2,) inverse frequencies ``theta ** (-2i / head_dim)``."""
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"head_dim: expected a positive even number for RoPE, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=dtype) / jnp.asarray(head_dim, dtype=dtype)
    return jnp.asarray(theta, dtype=dtype) ** -exponents


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x (B, S, N, d) by absolute positions (S,) or (B, S); returns x.dtype, computed in >= float32."""
    if x.ndim != 4:
        raise ValueError(f"x: expected shape (B, S, N, d), got {x.shape}")
    compute_dtype = jnp.promote_types(jnp.float32, x.dtype)
    inverse_frequencies = rope_inverse_frequencies(x.shape[-1], theta, compute_dtype)
    angles = positions.astype(compute_dtype)[..., None] * inverse_frequencies  # (..., S, d/2)
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]  # (B or 1, S, 1, d/2)
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(compute_dtype), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
