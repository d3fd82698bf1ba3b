"""(I + A)⁻¹ of many small strictly lower triangular matrices, and its gradient, as NVIDIA GPU kernels (Pallas,
Triton lowering).

The chunked gated delta rule inverts one (C, C) matrix per (sequence, head, chunk). XLA runs the block doubling of
:func:`m2rnn_jax.ops.gated_delta_rule.chunked.unit_lower_inverse` as 2 log2(C) batched matmuls, each a launch
that writes and reads back every matrix (C = 64: 12 launches plus the masks between them); here one program
keeps its matrix in registers through all the levels:

    T_1 = I,    T_2b = T_b - T_b (M_b T_b),    M_b = A on the (odd, even) b-blocks inside each 2b-block      (forward)
    dA = strict_lower(-Tᵀ dT Tᵀ)                                                                           (backward)

Grid: one program per matrix. Products are float32 with a float32 accumulator at ``precision`` (HIGHEST: full
float32; DEFAULT: the tensor cores' TF32, as XLA's float32 matmuls at DEFAULT on these GPUs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NUM_WARPS = 4


def operand_precision(dtype: jnp.dtype) -> lax.Precision | None:
    """The precision of a kernel product with ``dtype`` operands: full for float32 (no TF32), the matrix units'
    default for 16-bit ones (used by the GDN kernels)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def dot(
    a: jax.Array, b: jax.Array, precision: lax.Precision | None, *, transpose_a: bool = False, transpose_b: bool = False
) -> jax.Array:
    """a @ b with either operand transposed, float32 accumulator, at ``precision`` (None: the operands' default;
    also used by :mod:`pallas_kernels.gpu.gdn_chunk_factors`)."""
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _indices(size: int) -> tuple[jax.Array, jax.Array]:
    return lax.broadcasted_iota(jnp.int32, (size, size), 0), lax.broadcasted_iota(jnp.int32, (size, size), 1)


def doubling_inverse(A: jax.Array, precision: lax.Precision) -> jax.Array:
    """(I + A)⁻¹ of one (C, C) float32 matrix inside a kernel (only A's strictly lower part is read): the block
    doubling, unrolled over its log2(C) levels with T in registers."""
    size = A.shape[-1]
    rows, cols = _indices(size)
    T = jnp.where(rows == cols, 1.0, 0.0).astype(jnp.float32)
    level = 0
    while (1 << level) < size:
        same_pair = (rows >> (level + 1)) == (cols >> (level + 1))
        below = (rows >> level) > (cols >> level)
        M = jnp.where(same_pair & below, A, 0.0)
        T = T - dot(T, dot(M, T, precision), precision)
        level += 1
    return T


def _forward_kernel(a_ref, t_ref, *, precision: lax.Precision):
    t_ref[...] = doubling_inverse(a_ref[...].astype(jnp.float32), precision).astype(t_ref.dtype)


def inverse_cotangent(T: jax.Array, dT: jax.Array, precision: lax.Precision) -> jax.Array:
    """dA = strict_lower(-Tᵀ dT Tᵀ) of one (C, C) float32 T = (I + A)⁻¹ and its cotangent, inside a kernel (also
    used by :mod:`pallas_kernels.gpu.gdn_chunk_factors`)."""
    rows, cols = _indices(T.shape[-1])
    inner = dot(T, dT, precision, transpose_a=True)  # Tᵀ dT
    dA = -dot(inner, T, precision, transpose_b=True)  # (Tᵀ dT) Tᵀ
    return jnp.where(rows > cols, dA, 0.0)


def _backward_kernel(t_ref, dt_ref, da_ref, *, precision: lax.Precision):
    dA = inverse_cotangent(t_ref[...].astype(jnp.float32), dt_ref[...].astype(jnp.float32), precision)
    da_ref[...] = dA.astype(da_ref.dtype)


def _check(name: str, x: jax.Array) -> int:
    size = x.shape[-1]
    if x.ndim < 2 or x.shape[-2] != size or size < 16 or size & (size - 1):
        raise ValueError(f"{name}: expected shape (..., C, C) with C a power of two >= 16, got {x.shape}")
    if x.dtype != jnp.float32:
        raise ValueError(f"{name}: expected float32, got {x.dtype}")
    return size


def _call(kernel, name: str, operands: tuple[jax.Array, ...], size: int, interpret: bool) -> jax.Array:
    shape = operands[0].shape
    count = math.prod(shape[:-2])
    spec = pl.BlockSpec((None, size, size), lambda i: (i, 0, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((count, size, size), jnp.float32),
        grid=(count,),
        in_specs=[spec] * len(operands),
        out_specs=spec,
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name=name,
    )(*(x.reshape(count, size, size) for x in operands))
    return out.reshape(shape)


def unit_lower_inverse_forward(
    A: jax.Array, *, precision: lax.Precision = lax.Precision.HIGHEST, interpret: bool = False
) -> jax.Array:
    """A (..., C, C) float32 strictly lower triangular (C a power of two >= 16) -> (I + A)⁻¹, same shape.

    Only A's strictly lower part is read (as the doubling's masks read it)."""
    size = _check("A", A)
    kernel = functools.partial(_forward_kernel, precision=precision)
    return _call(kernel, "unit_lower_inverse_forward", (A,), size, interpret)


def unit_lower_inverse_backward(
    T: jax.Array, dT: jax.Array, *, precision: lax.Precision = lax.Precision.HIGHEST, interpret: bool = False
) -> jax.Array:
    """T = (I + A)⁻¹ and its cotangent dT (..., C, C) float32 -> dA = strict_lower(-Tᵀ dT Tᵀ), same shape."""
    size = _check("T", T)
    if dT.shape != T.shape or dT.dtype != T.dtype:
        raise ValueError(f"dT: expected {T.dtype} of shape {T.shape}, got {dT.dtype} of shape {dT.shape}")
    kernel = functools.partial(_backward_kernel, precision=precision)
    return _call(kernel, "unit_lower_inverse_backward", (T, dT), size, interpret)
