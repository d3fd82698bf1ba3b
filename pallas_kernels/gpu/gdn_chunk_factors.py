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

The backward (:func:`chunk_factors_backward`) is one kernel on the same grid: from the factors' cotangents and the
forward's T it forms dQ, dK, dV (written in the inputs' layout, so XLA transposes nothing back) and the cotangents
of β and the decay weights (T's cotangent through dA = strict_lower(-Tᵀ dT Tᵀ)), recomputing K Kᵀ and Q Kᵀ; K and V
are walked in blocks so that only (C, C) matrices stay in registers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.gdn_chunk_states import StatesKernelConfig, TiledKernelConfig, require_shapes
from pallas_kernels.gpu.unit_lower_inverse import dot, doubling_inverse, inverse_cotangent, operand_precision


@dataclasses.dataclass(frozen=True)
class FactorsKernelConfig(StatesKernelConfig):
    """Launch parameters (the walk's fields and checks): U's columns per product, Triton warps and pipeline stages.
    The default compiles without register spills for C=64, K=256, V=512 bf16 (Triton 3.6, sm_90) and is the fastest
    of ``gdn_check.py``'s sweep there on an H200: 0.360 ms (the next, 128/4/2: 0.448; session 26)."""

    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class FactorsBackwardKernelConfig(TiledKernelConfig):
    """Launch parameters of the backward: rows of K and columns of V per loop step, Triton warps and pipeline
    stages. The default compiles without register spills for C=64, K=256, V=512 bf16 (Triton 3.6, sm_90) and is
    the fastest of ``gdn_check.py``'s sweep there on an H200: 0.742 ms (the next, 32/32/8/3: 0.760; session 26)."""

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 8
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
    exact = operand_precision(dot_dtype)
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


def _token_major(chunk: int, width: int) -> pl.BlockSpec:
    """(B, n, C, H, width) -> the (C, width) tile of the grid's (sequence, head, chunk)."""
    return pl.BlockSpec((None, None, chunk, None, width), lambda b, h, c: (b, c, 0, h, 0))


def _heads_first(*shape: int) -> pl.BlockSpec:
    """(B, H, n, *shape) -> the ``shape`` tile of the grid's (sequence, head, chunk)."""
    return pl.BlockSpec((None, None, None, *shape), lambda b, h, c: (b, h, c) + (0,) * len(shape))


def _stage_specs(chunk: int, k_dim: int, v_dim: int) -> list[pl.BlockSpec]:
    """The tiles of the stage's inputs, in both kernels' order: q, k, v token-major; beta, decay, start, end."""
    return [
        _token_major(chunk, k_dim),
        _token_major(chunk, k_dim),
        _token_major(chunk, v_dim),
        _heads_first(chunk),
        _heads_first(chunk, chunk),
        _heads_first(chunk),
        _heads_first(chunk),
    ]


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

    def out(width: int, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, width), dtype)

    return tuple(
        pl.pallas_call(
            functools.partial(_kernel, block_v=block_v, precision=precision),
            out_shape=[out(v_dim, q.dtype), *(out(k_dim, q.dtype) for _ in range(3)), *(out(chunk, jnp.float32),) * 2],
            grid=(batch, heads, num_chunks),
            in_specs=_stage_specs(chunk, k_dim, v_dim),
            out_specs=[
                _heads_first(chunk, v_dim),
                *(_heads_first(chunk, k_dim) for _ in range(3)),
                *(_heads_first(chunk, chunk) for _ in range(2)),
            ],
            compiler_params=config.compiler_params(),
            interpret=interpret,
            name="gdn_chunk_factors_forward",
        )(q, k, v, *(x.astype(jnp.float32) for x in (beta, decay, start, end)))
    )


def _backward_kernel(
    q_ref,
    k_ref,
    v_ref,
    beta_ref,
    decay_ref,
    start_ref,
    end_ref,
    t_ref,
    du_ref,
    dwk_ref,
    dkd_ref,
    dqd_ref,
    dqk_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dbeta_ref,
    ddecay_ref,
    dstart_ref,
    dend_ref,
    *,
    block_k: int,
    block_v: int,
    precision: lax.Precision,
):
    # The cotangents of the forward's five products, in four passes that keep only (C, C) matrices and one
    # (C, block) tile of each operand live: (1) K Kᵀ, Q Kᵀ and dWk Kᵀ summed over K's blocks; (2) dU Vᵀ over V's
    # blocks, writing dV = (T diag β)ᵀ dU block by block; (3) the (C, C) algebra: dT, the inverse's cotangent dA,
    # the cotangents of β, the decay weights and start; (4) dQ and dK block by block over K. T, the decay weights
    # and dQK are read from memory where they are used, so that fewer (C, C) matrices stay in registers.
    dot_dtype = k_ref.dtype
    exact = operand_precision(dot_dtype)
    beta, start = beta_ref[...], start_ref[...]
    size = beta.shape[-1]
    square = jnp.zeros((size, size), jnp.float32)

    def k_block(j: jax.Array) -> pl.Slice:
        return pl.ds(pl.multiple_of(j * block_k, block_k), block_k)

    def v_block(j: jax.Array) -> pl.Slice:
        return pl.ds(pl.multiple_of(j * block_v, block_v), block_v)

    def products_over_k(j, sums):  # (1)
        kk, qk, dtbs = sums
        b = k_block(j)
        k = k_ref[:, b]
        kk = kk + dot(k, k, exact, transpose_b=True)
        qk = qk + dot(q_ref[:, b], k, exact, transpose_b=True)
        return kk, qk, dtbs + dot(dwk_ref[:, b].astype(dot_dtype), k, exact, transpose_b=True)

    kk, qk, dtbs = lax.fori_loop(0, k_ref.shape[-1] // block_k, products_over_k, (square, square, square))
    tb = (t_ref[...] * beta[None, :]).astype(dot_dtype)

    def products_over_v(j, dtb):  # (2)
        b = v_block(j)
        du = du_ref[:, b].astype(dot_dtype)
        dv_ref[:, b] = dot(tb, du, exact, transpose_a=True).astype(dv_ref.dtype)
        return dtb + dot(du, v_ref[:, b], exact, transpose_b=True)

    dtb = lax.fori_loop(0, v_ref.shape[-1] // block_v, products_over_v, square)

    # (3) U = (T diag β) V and Wk = (T diag(β start)) K give T's cotangent and the column scalings' (per column i)
    T = t_ref[...]
    dbeta = jnp.sum(T * dtb, axis=0)
    dstart_t = jnp.sum(T * dtbs, axis=0)
    dA = inverse_cotangent(T, dtb * beta[None, :] + dtbs * (beta * start)[None, :], precision)
    # A = strict_lower(β_t (K Kᵀ)_ti decay_ti) and QK = (Q Kᵀ) ⊙ decay
    decay = decay_ref[...]
    ddecay_ref[...] = dA * beta[:, None] * kk + dqk_ref[...] * qk
    dbeta = dbeta + dstart_t * start + jnp.sum(dA * kk * decay, axis=1)
    d_kk = dA * beta[:, None] * decay  # the cotangent of K Kᵀ (strictly lower, as dA)
    sym = (d_kk + d_kk.T).astype(dot_dtype)
    d_qk = (dqk_ref[...] * decay).astype(dot_dtype)  # the cotangent of Q Kᵀ
    tbs = (t_ref[...] * (beta * start)[None, :]).astype(dot_dtype)
    end = end_ref[...]

    def cotangents_over_k(j, sums):  # (4)
        dend, dstart = sums
        b = k_block(j)
        k, q = k_ref[:, b], q_ref[:, b]
        dkd, dqd = dkd_ref[:, b].astype(jnp.float32), dqd_ref[:, b].astype(jnp.float32)
        dk = dot(tbs, dwk_ref[:, b].astype(dot_dtype), exact, transpose_a=True)
        dk = dk + dot(sym, k, exact) + dot(d_qk, q, exact, transpose_a=True) + dkd * end[:, None]
        dk_ref[:, b] = dk.astype(dk_ref.dtype)
        dq_ref[:, b] = (dot(d_qk, k, exact) + dqd * start[:, None]).astype(dq_ref.dtype)
        dend = dend + jnp.sum(dkd * k.astype(jnp.float32), axis=1)
        return dend, dstart + jnp.sum(dqd * q.astype(jnp.float32), axis=1)

    zeros = jnp.zeros((size,), jnp.float32)
    dend, dstart = lax.fori_loop(0, k_ref.shape[-1] // block_k, cotangents_over_k, (zeros, zeros))
    dbeta_ref[...] = dbeta
    dstart_ref[...] = dstart + dstart_t * beta
    dend_ref[...] = dend


def chunk_factors_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    decay: jax.Array,
    start: jax.Array,
    end: jax.Array,
    T: jax.Array,
    cotangents: tuple[jax.Array, ...],
    *,
    precision: lax.Precision,
    config: FactorsBackwardKernelConfig = FactorsBackwardKernelConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """The cotangents of :func:`chunk_factors_forward`'s inputs from those of its factors, with its T.

    Args:
      q, k, v, beta, decay, start, end: as :func:`chunk_factors_forward`; T (B, H, n, C, C) float32 its inverse.
      cotangents: (dU, dWk, dKd, dQd, dQK) of the factors (dU (B, H, n, C, V), dWk, dKd, dQd (B, H, n, C, K), dQK
        (B, H, n, C, C); any float dtypes).
      precision: of the inverse's float32 products (its cotangent's).

    Returns:
      dq, dk (B, n, C, H, K) and dv (B, n, C, H, V) in the inputs' dtype and layout; dbeta (B, H, n, C), ddecay
      (B, H, n, C, C), dstart, dend (B, H, n, C) float32.
    """
    batch, num_chunks, chunk, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    dU, dWk, dKd, dQd, dQK = cotangents
    expected = {
        "dU": (dU, (batch, heads, num_chunks, chunk, v_dim)),
        "dWk": (dWk, (batch, heads, num_chunks, chunk, k_dim)),
        "dKd": (dKd, (batch, heads, num_chunks, chunk, k_dim)),
        "dQd": (dQd, (batch, heads, num_chunks, chunk, k_dim)),
        "dQK": (dQK, (batch, heads, num_chunks, chunk, chunk)),
        "T": (T, (batch, heads, num_chunks, chunk, chunk)),
    }
    require_shapes(expected, "q (B, n, C, H, K) and v")

    def out(*shape: int, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    float32 = (x.astype(jnp.float32) for x in (beta, decay, start, end, T, dQK))
    beta, decay, start, end, T, dQK = float32
    per_chunk = (batch, heads, num_chunks, chunk)
    return tuple(
        pl.pallas_call(
            functools.partial(
                _backward_kernel,
                block_k=min(config.block_k, k_dim),
                block_v=min(config.block_v, v_dim),
                precision=precision,
            ),
            out_shape=[
                out(*q.shape, dtype=q.dtype),
                out(*k.shape, dtype=k.dtype),
                out(*v.shape, dtype=v.dtype),
                out(*per_chunk),
                out(*per_chunk, chunk),
                out(*per_chunk),
                out(*per_chunk),
            ],
            grid=(batch, heads, num_chunks),
            in_specs=[
                *_stage_specs(chunk, k_dim, v_dim),
                _heads_first(chunk, chunk),  # T
                _heads_first(chunk, v_dim),  # dU
                *(_heads_first(chunk, k_dim) for _ in range(3)),  # dWk, dKd, dQd
                _heads_first(chunk, chunk),  # dQK
            ],
            out_specs=_stage_specs(chunk, k_dim, v_dim),  # the inputs' cotangents, in their layouts
            compiler_params=config.compiler_params(),
            interpret=interpret,
            name="gdn_chunk_factors_backward",
        )(q, k, v, beta, decay, start, end, T, dU, dWk, dKd, dQd, dQK)
    )
