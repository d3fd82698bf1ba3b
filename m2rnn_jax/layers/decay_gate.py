"""Softplus decay gate shared by M2RNN, Gated DeltaNet and Mamba2 (SPEC §2.3).

``dt = softplus(x + dt_bias)``, ``a = -exp(A_log) * dt`` (the log-decay); M2RNN uses the forget value
``f = exp(a)`` (``final_exponential=True``). All gate math runs in ``promote_types(float32, x.dtype)`` and the
result is cast to the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.typing import Dtype


def validate_decay_gate_init(
    A_init_min: float, A_init_max: float, dt_init_min: float, dt_init_max: float, dt_init_floor: float
) -> None:
    """Raise ``ValueError`` naming the field if the gate's init ranges are invalid (SPEC §2.3)."""
    if A_init_min < 0:
        raise ValueError(f"A_init_min: expected >= 0, got {A_init_min}")
    if A_init_max < A_init_min:
        raise ValueError(f"A_init_max: expected >= A_init_min ({A_init_min}), got {A_init_max}")
    if dt_init_min <= 0:
        raise ValueError(f"dt_init_min: expected > 0, got {dt_init_min}")
    if dt_init_max < dt_init_min:
        raise ValueError(f"dt_init_max: expected >= dt_init_min ({dt_init_min}), got {dt_init_max}")
    if dt_init_floor < 0:
        raise ValueError(f"dt_init_floor: expected >= 0, got {dt_init_floor}")


def inverse_softplus(y: jax.Array) -> jax.Array:
    """x with softplus(x) = y for y > 0: ``y + log(-expm1(-y))``."""
    return y + jnp.log(-jnp.expm1(-y))


class SoftplusDecayGate(nnx.Module):
    """Per-head softplus decay gate with parameters ``A_log`` (N,) and ``dt_bias`` (N,).

    Init (SPEC §2.3): ``A ~ U(A_init_min, A_init_max)``, ``A_log = log A``;
    ``dt = exp(U(log dt_init_min, log dt_init_max))`` clamped below at ``dt_init_floor``,
    ``dt_bias = softplus^-1(dt)``. Both parameters are stored in ``promote_types(float32, param_dtype)``
    (float32 unless float64 is requested) and carry no weight decay (SPEC §0.4).

    Args:
        num_heads: N, the number of gate values per token.
        dtype: compute dtype of the returned values.
        param_dtype: requested storage dtype (raised to at least float32).
    """

    def __init__(
        self,
        num_heads: int,
        *,
        A_init_min: float = 0.0,
        A_init_max: float = 16.0,
        dt_init_min: float = 1e-3,
        dt_init_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads <= 0:
            raise ValueError(f"num_heads: expected a positive value, got {num_heads}")
        validate_decay_gate_init(A_init_min, A_init_max, dt_init_min, dt_init_max, dt_init_floor)
        self.num_heads = num_heads
        self.dtype = dtype
        storage_dtype = jnp.promote_types(jnp.float32, param_dtype)

        A = jax.random.uniform(rngs.params(), (num_heads,), dtype=storage_dtype, minval=A_init_min, maxval=A_init_max)
        log_dt = jax.random.uniform(
            rngs.params(),
            (num_heads,),
            dtype=storage_dtype,
            minval=math.log(dt_init_min),
            maxval=math.log(dt_init_max),
        )
        dt = jnp.maximum(jnp.exp(log_dt), jnp.asarray(dt_init_floor, dtype=storage_dtype))
        self.A_log = nnx.Param(jnp.log(A), out_sharding=("heads",), eager_sharding=False)
        self.dt_bias = nnx.Param(inverse_softplus(dt), out_sharding=("heads",), eager_sharding=False)

    def time_step(self, x: jax.Array) -> jax.Array:
        """x (..., N) raw gate inputs -> dt = softplus(x + dt_bias) (..., N) in promote_types(float32, x.dtype)."""
        if x.shape[-1] != self.num_heads:
            raise ValueError(f"x: expected last axis of size {self.num_heads}, got shape {x.shape}")
        compute_dtype = jnp.promote_types(jnp.float32, x.dtype)
        return jax.nn.softplus(x.astype(compute_dtype) + self.dt_bias[...].astype(compute_dtype))

    def __call__(self, x: jax.Array, *, final_exponential: bool) -> jax.Array:
        """x (..., N) -> log-decay ``-exp(A_log) * dt`` or, with ``final_exponential``, ``f = exp(log-decay)``.

        The result has shape (..., N) and dtype ``dtype``; f lies in (0, 1].
        """
        dt = self.time_step(x)
        log_decay = -jnp.exp(self.A_log[...].astype(dt.dtype)) * dt
        out = jnp.exp(log_decay) if final_exponential else log_decay
        return out.astype(self.dtype)
