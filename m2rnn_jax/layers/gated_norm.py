"""Gated RMSNorm with a hand-written backward: ``rms_norm(o * silu(gate)) * scale`` over the last axis.

The Gated DeltaNet output path (SPEC §9.4: ``o_norm(o * SiLU(gate))`` per head over dv). Autodiff of the
composition keeps float32 copies of ``o``, ``silu(gate)`` and their product for the backward and reads them in
several passes; here the backward keeps only the inputs (in their own dtypes) and the scale, recomputes the
product, and runs RMSNorm's closed-form backward (:func:`~m2rnn_jax.layers.norm.rms_norm_backward`) on it:

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

from m2rnn_jax.layers.norm import rms_norm_backward, rms_norm_reference
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


def _gated(o: jax.Array, gate: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(o, silu(gate), o * silu(gate)) in ``promote_types(float32, o.dtype)``."""
    compute = jnp.promote_types(jnp.float32, o.dtype)
    o = o.astype(compute)
    activated = jax.nn.silu(gate.astype(compute))
    return o, activated, o * activated


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated_rms_norm(eps: float, dtype: jnp.dtype, o: jax.Array, gate: jax.Array, scale: jax.Array) -> jax.Array:
    return rms_norm_reference(_gated(o, gate)[2], scale, eps=eps, dtype=dtype)


def _forward(eps: float, dtype: jnp.dtype, o: jax.Array, gate: jax.Array, scale: jax.Array):
    return _gated_rms_norm(eps, dtype, o, gate, scale), (o, gate, scale)


def _backward(eps: float, dtype: jnp.dtype, residuals, dy: jax.Array):
    o_in, gate_in, scale_in = residuals
    # Without the barrier XLA merges (CSE) this recomputation with the forward's identical product and keeps that
    # float32 product (..., F) alive from the forward to here (the 1L 400M hybrid at 8 x 4096: 20 float32 arrays of
    # 512 MiB; its peak memory on an H100 is 49.3 GiB with the barrier against 51.8 GiB without, at the same step
    # time: experiments/RESULTS.md, session 21).
    o_in, gate_in = jax.lax.optimization_barrier((o_in, gate_in))
    o, activated, g = _gated(o_in, gate_in)
    dg, d_scale = rms_norm_backward(eps, dtype, (g, scale_in), dy)  # dg in g's (compute) dtype
    sigmoid = jax.nn.sigmoid(gate_in.astype(g.dtype))
    d_activation = sigmoid * (1 + gate_in.astype(g.dtype) * (1 - sigmoid))  # silu'(z)
    return (dg * activated).astype(o_in.dtype), (dg * o * d_activation).astype(gate_in.dtype), d_scale


_gated_rms_norm.defvjp(_forward, _backward)
