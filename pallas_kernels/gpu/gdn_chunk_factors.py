"""The chunk-local stage of the chunked gated delta rule in one NVIDIA GPU kernel (Pallas, Triton lowering).

Per (sequence, head, chunk), with the chunk's decay weights given (decay (C, C), start, end (C,): the weights of
:func:`m2rnn_jax.ops.chunking.chunk_decays`, resets folded in) and β (C,):

    A  = strict_lower(β_t (K Kᵀ)_ti decay_ti),     T = (I + A)⁻¹ (block doubling in registers)
    U  = (T diag β) V,     Wk = (T diag(β start)) K,     Kd = diag(end) K,     Qd = diag(start) Q,
    QK = (Q Kᵀ) ⊙ decay

One program per chunk keeps K, Q, the (C, C) matrices and T in registers and writes each factor once, where XLA
wrote and read back the (C, C) products, the masks and the inverse's input between launches. The products take the
inputs' dtype as operands with a float32 accumulator (float32 inputs at full precision), as
:func:`m2rnn_jax.ops.gated_delta_rule.chunked.local_factors` does; the inverse's products take ``precision``.
U's columns are formed in blocks of ``block_v``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu.unit_lower_inverse import doubling_inverse


@dataclasses.dataclass(frozen=True)
class FactorsKernelConfig:
    """Launch parameters: U's columns per product, Triton warps and software-pipeline stages."""

    block_v: int = 128
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_v", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v: expected a power of two >= 16, got {self.block_v}")


def _dot(a: jax.Array, b: jax.Array, *, transpose_b: bool = False, precision=None) -> jax.Array:
    """a @ b (or a @ bᵀ) with a float32 accumulator; float32 operands at full precision unless ``precision``."""
    if precision is None:
        precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1,) if transpose_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    beta_ref,
    decay_ref,
    start_ref,
    end_ref,
    u_ref,
    wk_ref,
    kd_ref,
    qd_ref,
    qk_ref,
    t_ref,
    *,
    block_v: int,
    precision: lax.Precision,
):
    # Each input is read where it is used (K again after the inverse) so that no (C, K) tile stays in registers
    # across the inverse: the kernel's register pressure, not its memory traffic, is what limits it.
    dot_dtype = k_ref.dtype
    beta, start = beta_ref[...], start_ref[...]
    size = beta.shape[-1]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    qk_ref[...] = _dot(q_ref[...], k_ref[...], transpose_b=True) * decay_ref[...]
    qd_ref[...] = (q_ref[...] * start[:, None]).astype(qd_ref.dtype)
    kd_ref[...] = (k_ref[...] * end_ref[...][:, None]).astype(kd_ref.dtype)
    k = k_ref[...]
    A = jnp.where(rows > cols, beta[:, None] * _dot(k, k, transpose_b=True) * decay_ref[...], 0.0)
    T = doubling_inverse(A, precision)
    t_ref[...] = T
    wk_ref[...] = _dot((T * (beta * start)[None, :]).astype(dot_dtype), k_ref[...]).astype(wk_ref.dtype)
    Tb = (T * beta[None, :]).astype(dot_dtype)
    for j in range(v_ref.shape[-1] // block_v):  # unrolled over U's column blocks
        cols_j = pl.ds(j * block_v, block_v)
        u_ref[:, cols_j] = _dot(Tb, v_ref[:, cols_j]).astype(u_ref.dtype)


def chunk_factors_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    decay: jax.Array,
    start: jax.Array,
    end: jax.Array,
    *,
    precision: lax.Precision,
    config: FactorsKernelConfig = FactorsKernelConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """The chunk-local factors of every chunk.

    Args:
      q, k (..., C, K) and v (..., C, V) in one dtype (the product dtype: bf16, f16 or f32); beta, start, end
        (..., C) and decay (..., C, C) float32; C, K, V powers of two >= 16.
      precision: of the inverse's float32 products.

    Returns:
      U (..., C, V), Wk, Kd, Qd (..., C, K) in the product dtype; QK and T = (I + A)⁻¹ (..., C, C) float32.
    """
    *lead, chunk, k_dim = q.shape
    v_dim = v.shape[-1]
    count = math.prod(lead)
    block_v = min(config.block_v, v_dim)

    def spec(*shape):
        return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))

    def flat(x: jax.Array) -> jax.Array:
        return x.reshape(count, *x.shape[len(lead) :])

    dt = q.dtype
    out = pl.pallas_call(
        functools.partial(_kernel, block_v=block_v, precision=precision),
        out_shape=[
            jax.ShapeDtypeStruct((count, chunk, v_dim), dt),
            *(jax.ShapeDtypeStruct((count, chunk, k_dim), dt) for _ in range(3)),
            *(jax.ShapeDtypeStruct((count, chunk, chunk), jnp.float32) for _ in range(2)),
        ],
        grid=(count,),
        in_specs=[
            spec(chunk, k_dim),
            spec(chunk, k_dim),
            spec(chunk, v_dim),
            spec(chunk),
            spec(chunk, chunk),
            spec(chunk),
            spec(chunk),
        ],
        out_specs=[
            spec(chunk, v_dim),
            *(spec(chunk, k_dim) for _ in range(3)),
            *(spec(chunk, chunk) for _ in range(2)),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="gdn_chunk_factors_forward",
    )(*(flat(x) for x in (q, k, v)), *(flat(x.astype(jnp.float32)) for x in (beta, decay, start, end)))
    return tuple(x.reshape(*lead, *x.shape[1:]) for x in out)
