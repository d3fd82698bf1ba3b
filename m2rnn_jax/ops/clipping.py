"""Identity with a clamped cotangent: the building block of M2RNN's state-gradient clipping.

SPEC §0.1 / §2.7: walking backward, the state cotangent that arrives from step t+1 (and the cotangent of the
returned final state) is clamped to ``[-c, c]`` before the readout term ``q_t dy_t^T`` is added; ``dh0`` is not
clamped. In a scan this is exactly: read ``y_t`` from the unclamped ``H_t`` and carry ``clamp_cotangent(H_t, c)``
to the next step (SPEC §2.8).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def clamp_cotangent(x: jax.Array, limit: float) -> jax.Array:
    """Return ``x`` unchanged; in the backward pass clamp its cotangent element-wise to ``[-limit, limit]``."""
    return x


def _clamp_fwd(x: jax.Array, limit: float) -> tuple[jax.Array, None]:
    return x, None


def _clamp_bwd(limit: float, _residual: None, cotangent: jax.Array) -> tuple[jax.Array]:
    return (jnp.clip(cotangent, -limit, limit),)


clamp_cotangent.defvjp(_clamp_fwd, _clamp_bwd)


def normalize_clipping(gradient_clipping: float | None) -> float | None:
    """Validate ``gradient_clipping`` and return ``|c|`` (a negative value means its absolute value), or None."""
    if gradient_clipping is None:
        return None
    if isinstance(gradient_clipping, bool) or not isinstance(gradient_clipping, (int, float)):
        raise ValueError(
            f"gradient_clipping: expected None or a finite float, got {type(gradient_clipping).__name__} "
            f"{gradient_clipping!r}"
        )
    limit = abs(float(gradient_clipping))
    if not math.isfinite(limit):
        raise ValueError(f"gradient_clipping: expected None or a finite float, got {gradient_clipping!r}")
    return limit
