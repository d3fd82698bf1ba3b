"""Gated RMSNorm with a hand-written backward: ``rms_norm(o * silu(gate)) * scale`` over the last axis.

The Gated DeltaNet output path (SPEC §9.4: ``o_norm(o * SiLU(gate))`` per head over dv). Autodiff of the
composition keeps float32 copies of ``o``, ``silu(gate)`` and their product for the backward and reads them in
several passes; here the backward keeps only the inputs (in their own dtypes) and the scale, and recomputes the
product and the statistics from them:

    g = o * silu(z);  r = 1 / sqrt(mean(g^2) + eps);  y = g * r * w
    dg = r * (dy w - (g r) * mean(dy w * g r));  do = dg * silu(z);  dz = dg * o * silu'(z)
    dw = sum over rows of dy * g * r

All arithmetic runs in ``promote_types(float32, o.dtype)``; ``y`` is returned in ``dtype``, the gradients in the
dtypes of their inputs. The forward is the same expression as ``RMSNorm(o * silu(gate))`` (same values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m2rnn_jax.typing import Dtype


def gated_rms_norm(o: jax.Array, gate: jax.Array, scale: jax.Array, *, eps: float, dtype: Dtype) -> jax.Array:
    """o, gate (..., F), scale (F,) -> (..., F) in ``dtype``: ``rms_norm(o * silu(gate)) * scale``.

    Args:
        o: the values to normalise (e.g. the recurrence output, (B, S, H, dv)).
        gate: the gate's pre-activation, same shape as ``o``.
        scale: the norm's learnable scale (F,).
        eps: added to the mean square (> 0).
        dtype: dtype of the result.
    """
    if gate.shape != o.shape:
        raise ValueError(f"gate: expected shape {o.shape} (the shape of o), got {gate.shape}")
    if scale.shape != o.shape[-1:]:
        raise ValueError(f"scale: expected shape {o.shape[-1:]}, got {scale.shape}")
    if not eps > 0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    return _gated_rms_norm(float(eps), jnp.dtype(dtype), o, gate, scale)


def _compute_dtype(o: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.float32, o.dtype)


def _gated(o: jax.Array, gate: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(o, silu(gate), o * silu(gate)) in the compute dtype."""
    compute = _compute_dtype(o)
    o = o.astype(compute)
    activated = jax.nn.silu(gate.astype(compute))
    return o, activated, o * activated


def _inverse_rms(g: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated_rms_norm(eps: float, dtype: jnp.dtype, o: jax.Array, gate: jax.Array, scale: jax.Array) -> jax.Array:
    _, _, g = _gated(o, gate)
    return (g * _inverse_rms(g, eps) * scale.astype(g.dtype)).astype(dtype)


def _forward(eps: float, dtype: jnp.dtype, o: jax.Array, gate: jax.Array, scale: jax.Array):
    return _gated_rms_norm(eps, dtype, o, gate, scale), (o, gate, scale)


def _backward(eps: float, dtype: jnp.dtype, residuals, dy: jax.Array):
    o_in, gate_in, scale_in = residuals
    o, activated, g = _gated(o_in, gate_in)
    r = _inverse_rms(g, eps)
    normed = g * r
    dy = dy.astype(g.dtype)
    dy_scaled = dy * scale_in.astype(g.dtype)
    dg = r * (dy_scaled - normed * jnp.mean(dy_scaled * normed, axis=-1, keepdims=True))
    sigmoid = jax.nn.sigmoid(gate_in.astype(g.dtype))
    d_activation = sigmoid * (1 + gate_in.astype(g.dtype) * (1 - sigmoid))  # silu'(z)
    d_o = dg * activated
    d_gate = dg * o * d_activation
    d_scale = jnp.sum((dy * normed).reshape(-1, normed.shape[-1]), axis=0)
    return d_o.astype(o_in.dtype), d_gate.astype(gate_in.dtype), d_scale.astype(scale_in.dtype)


_gated_rms_norm.defvjp(_forward, _backward)
