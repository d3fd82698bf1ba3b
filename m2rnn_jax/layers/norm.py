"""RMSNorm with a learnable scale, computed in (at least) float32 (SPEC §3.2 step 9, §9.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.typing import Dtype


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x**2, axis=-1) + eps) * scale`` over the last axis.

    The statistics and the scaling run in ``promote_types(float32, x.dtype)``; the result is cast to ``dtype``.

    Args:
        num_features: size F of the normalized (last) axis; ``scale`` has shape ``(F,)``, initialised to ones.
        eps: added to the mean square (lm-engine default 1e-5).
        dtype: output (compute) dtype.
        param_dtype: storage dtype of ``scale``.
        scale_sharding: logical axis name of ``scale`` (``"embed"`` for the residual stream, ``"heads"`` for
            a head-major feature axis, ``None`` for unsharded).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        scale_sharding: str | None = "embed",
    ):
        if num_features <= 0:
            raise ValueError(f"num_features: expected a positive value, got {num_features}")
        if eps <= 0:
            raise ValueError(f"eps: expected a positive value, got {eps}")
        self.num_features = num_features
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(
            jnp.ones((num_features,), dtype=param_dtype), out_sharding=(scale_sharding,), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., F) -> (..., F) in ``dtype``."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x: expected last axis of size {self.num_features}, got shape {x.shape}")
        compute_dtype = jnp.promote_types(jnp.float32, x.dtype)
        x = x.astype(compute_dtype)
        inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = x * inverse_rms * self.scale[...].astype(compute_dtype)
        return y.astype(self.dtype)
