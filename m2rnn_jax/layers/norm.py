"""RMSNorm with a learnable scale, computed in (at least) float32 (SPEC §3.2 step 9, §9.1).

:func:`rms_norm_reference` is the plain formula differentiated by JAX; :func:`rms_norm` gives the same values
behind a ``jax.custom_vjp`` with the closed-form backward. Its residuals are x in its own dtype and the scale, and
the backward recomputes the inverse RMS from x: autodiff of the plain formula keeps a float32 copy of x and sums
the two cotangents of x (square and scaling) in extra passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.manual_axes import vary_together
from m2rnn_jax.typing import Dtype


def rms_norm_reference(x: jax.Array, scale: jax.Array, *, eps: float, dtype: Dtype) -> jax.Array:
    """``x / sqrt(mean(x**2, axis=-1) + eps) * scale`` as a plain formula (the reference of :func:`rms_norm`).

    Args:
        x: (..., F); the math runs in ``promote_types(float32, x.dtype)``.
        scale: (F,).
        eps: added to the mean square.
        dtype: output dtype.

    Returns:
        (..., F) in ``dtype``.
    """
    compute_dtype = jnp.promote_types(jnp.float32, x.dtype)
    x = x.astype(compute_dtype)
    inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return (x * inverse_rms * scale.astype(compute_dtype)).astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, dtype: Dtype) -> jax.Array:
    """:func:`rms_norm_reference` (same arguments and result) with the closed-form backward of
    :func:`_rms_norm`: for g = dy * scale and x_hat = x * r, r = 1 / rms(x),
    ``dx = r * (g - x_hat * mean(g * x_hat))`` and ``d scale = sum over rows of dy * x_hat``. Under
    ``jax.shard_map`` x and scale are first cast to vary over the same manual axes
    (:mod:`m2rnn_jax.layers.manual_axes`)."""
    return _rms_norm(*vary_together(x, scale), eps, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Dtype) -> jax.Array:
    return rms_norm_reference(x, scale, eps=eps, dtype=dtype)


def _rms_norm_fwd(
    x: jax.Array, scale: jax.Array, eps: float, dtype: Dtype
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return rms_norm_reference(x, scale, eps=eps, dtype=dtype), (x, scale)


def rms_norm_backward(
    eps: float, dtype: Dtype, residuals: tuple[jax.Array, jax.Array], dy: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(dx (..., F) in x's dtype, d scale (F,) in scale's dtype) from dy (..., F): the backward of :func:`rms_norm`
    for ``residuals = (x, scale)`` (also the norm part of :func:`~m2rnn_jax.layers.gated_norm.gated_rms_norm`)."""
    x, scale = residuals
    compute_dtype = jnp.promote_types(jnp.float32, x.dtype)
    xc = x.astype(compute_dtype)
    dy = dy.astype(compute_dtype)
    g = dy * scale.astype(compute_dtype)
    # both row statistics read only x and dy (one pass): x_hat * mean(g * x_hat) = x * r**2 * mean(g * x)
    inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    mean_gx = jnp.mean(g * xc, axis=-1, keepdims=True)
    dx = inverse_rms * (g - xc * (inverse_rms * inverse_rms * mean_gx))
    dscale = jnp.sum(dy * (xc * inverse_rms), axis=tuple(range(x.ndim - 1)))
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, rms_norm_backward)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x**2, axis=-1) + eps) * scale`` over the last axis (:func:`rms_norm`).

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
        return rms_norm(x, self.scale[...], eps=self.eps, dtype=self.dtype)
