"""The chunk-local stage of the chunked gated delta rule in one NVIDIA GPU kernel (Pallas, Triton lowering).

Per (sequence, head, chunk), with the chunk's decay weights given (decay (C, C), start, end (C,): the weights of
:func:`m2rnn_jax.ops.chunking.chunk_decays`, resets folded in) and β (C,):

    A  = strict_lower(β_t (K Kᵀ)_ti decay_ti),     T = (I + A)⁻¹ (block doubling in registers)
    U  = (T diag β) V,     Wk = (T diag(β start)) K,     Kd = diag(end) K,     Qd = diag(start) Q,
    QK = (Q Kᵀ) ⊙ decay

One program per (sequence, head, chunk) (grid (B, H, n)) keeps the (C, C) matrices and T in registers and writes
each factor once, where XLA wrote and read back the (C, C) products, the masks and the inverse's input between
launches. It reads its head's rows of q, k, v in the inputs' own (B, S, H, ...) layout, so the inputs are not
transposed to heads-first before the kernel. The products take the inputs' dtype as operands with a float32
accumulator (float32 inputs at full precision), as :func:`m2rnn_jax.ops.gated_delta_rule.chunked.local_factors`
does; the inverse's products take ``precision``. U's columns are formed in blocks of ``block_v``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.gdn_chunk_states import StatesKernelConfig
from pallas_kernels.gpu.unit_lower_inverse import dot, doubling_inverse


@dataclasses.dataclass(frozen=True)
class FactorsKernelConfig(StatesKernelConfig):
    """Launch parameters (the walk's fields and checks): U's columns per product, Triton warps and pipeline stages.
    The default is the configuration that compiles without register spills for C=64, K=256, V=512 bf16 (Triton
    3.6, sm_90); not yet timed on a GPU."""

    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 1


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
    exact = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None  # float32 inputs at full precision
    beta, start = beta_ref[...], start_ref[...]
    size = beta.shape[-1]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    qk_ref[...] = dot(q_ref[...], k_ref[...], exact, transpose_b=True) * decay_ref[...]
    qd_ref[...] = (q_ref[...] * start[:, None]).astype(qd_ref.dtype)
    kd_ref[...] = (k_ref[...] * end_ref[...][:, None]).astype(kd_ref.dtype)
    k = k_ref[...]
    A = jnp.where(rows > cols, beta[:, None] * dot(k, k, exact, transpose_b=True) * decay_ref[...], 0.0)
    T = doubling_inverse(A, precision)
    t_ref[...] = T
    wk_ref[...] = dot((T * (beta * start)[None, :]).astype(dot_dtype), k_ref[...], exact).astype(wk_ref.dtype)
    Tb = (T * beta[None, :]).astype(dot_dtype)
    for j in range(v_ref.shape[-1] // block_v):  # unrolled over U's column blocks
        cols_j = pl.ds(j * block_v, block_v)
        u_ref[:, cols_j] = dot(Tb, v_ref[:, cols_j], exact).astype(u_ref.dtype)


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
      q, k (B, n, C, H, K) and v (B, n, C, H, V): the inputs split into chunks in their own (B, S, H, ...) layout
        (one program reads its head's (C, K) rows in place: no transpose to heads-first), in one dtype (the product
        dtype: bf16, f16 or f32); beta, start, end (B, H, n, C) and decay (B, H, n, C, C) float32; C, K, V powers
        of two >= 16.
      precision: of the inverse's float32 products.

    Returns:
      U (B, H, n, C, V), Wk, Kd, Qd (B, H, n, C, K) in the product dtype; QK and T = (I + A)⁻¹ (B, H, n, C, C)
      float32.
    """
    batch, num_chunks, chunk, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    block_v = min(config.block_v, v_dim)

    def token_major(width: int) -> pl.BlockSpec:  # (B, n, C, H, width) -> one (C, width) tile
        return pl.BlockSpec((None, None, chunk, None, width), lambda b, h, c: (b, c, 0, h, 0))

    def heads_first(*shape: int) -> pl.BlockSpec:  # (B, H, n, *shape) -> one tile of shape
        return pl.BlockSpec((None, None, None, *shape), lambda b, h, c: (b, h, c) + (0,) * len(shape))

    def out(width: int, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, width), dtype)

    return tuple(
        pl.pallas_call(
            functools.partial(_kernel, block_v=block_v, precision=precision),
            out_shape=[out(v_dim, q.dtype), *(out(k_dim, q.dtype) for _ in range(3)), *(out(chunk, jnp.float32),) * 2],
            grid=(batch, heads, num_chunks),
            in_specs=[
                token_major(k_dim),
                token_major(k_dim),
                token_major(v_dim),
                heads_first(chunk),
                heads_first(chunk, chunk),
                heads_first(chunk),
                heads_first(chunk),
            ],
            out_specs=[
                heads_first(chunk, v_dim),
                *(heads_first(chunk, k_dim) for _ in range(3)),
                *(heads_first(chunk, chunk) for _ in range(2)),
            ],
            compiler_params=config.compiler_params(),
            interpret=interpret,
            name="gdn_chunk_factors_forward",
        )(q, k, v, *(x.astype(jnp.float32) for x in (beta, decay, start, end)))
    )
