"""The walk's parallel input cotangents of the chunked gated delta rule as one NVIDIA GPU kernel (Pallas, Triton).

Once the backward walk (:mod:`pallas_kernels.gpu.gdn_chunk_states`) has given dW_c (the full cotangent of the new
values) and G_{c+1} (the cotangent of the state leaving chunk c), the cotangents of the walk's other inputs are
independent per chunk:

    dWk_c = -dW_c S_cᵀ,        dKd_c = W_c G_{c+1}ᵀ,        da_c = <G_{c+1}, S_c>

three reductions over V of (C or K, V) tiles of one chunk. XLA ran them as two batched products (Triton GEMM
fusions) and a separate reduction that read the (B, H, n, K, V) G and S once more (session 21's H100 profile of the
400M 1L hybrid: 5.06 and 3.52 ms of the 257 ms step). Here one program per (block of ``block_k`` rows of K,
sequence, head, chunk) loops over V in blocks of ``block_v``, keeping the two (C, block_k) products in float32
registers, and adds the block's part of da, so S and G are read once for all three. Products take the operands'
dtype with a float32 accumulator (float32 at full precision); da's partial sums per row block are added after.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.gdn_chunk_states import TiledKernelConfig, require_shapes
from pallas_kernels.gpu.unit_lower_inverse import dot, operand_precision


@dataclasses.dataclass(frozen=True)
class WalkCotangentsKernelConfig(TiledKernelConfig):
    """Launch parameters: rows of K per program, columns of V per loop step, Triton warps and pipeline stages. The
    default is the fastest of ``gdn_check.py``'s sweep at B=8, S=4096, H=2, C=64, K=256, V=512 bf16 on an H200:
    0.386 ms (128/64/8/2: 0.440; XLA's einsums: 0.570; session 26, experiments/RESULTS.md)."""

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _kernel(dw_ref, s_ref, w_ref, g_ref, dwk_ref, dkd_ref, da_ref, *, block_v: int):
    dot_dtype = s_ref.dtype
    exact = operand_precision(dot_dtype)

    def column_block(j, sums):
        dwk, dkd, da = sums
        cols = pl.ds(pl.multiple_of(j * block_v, block_v), block_v)
        s, g = s_ref[:, cols], g_ref[:, cols]
        dwk = dwk + dot(dw_ref[:, cols], s, exact, transpose_b=True)
        dkd = dkd + dot(w_ref[:, cols], g, exact, transpose_b=True)
        return dwk, dkd, da + jnp.sum(s.astype(jnp.float32) * g.astype(jnp.float32))

    chunk, block_k = dwk_ref.shape
    zeros = jnp.zeros((chunk, block_k), jnp.float32)
    dwk, dkd, da = lax.fori_loop(0, s_ref.shape[-1] // block_v, column_block, (zeros, zeros, jnp.float32(0.0)))
    dwk_ref[...] = (-dwk).astype(dwk_ref.dtype)
    dkd_ref[...] = dkd.astype(dkd_ref.dtype)
    da_ref[...] = da


def walk_input_cotangents(
    dw: jax.Array,
    starts: jax.Array,
    w: jax.Array,
    g_next: jax.Array,
    *,
    config: WalkCotangentsKernelConfig = WalkCotangentsKernelConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dWk, dKd, da) of every chunk.

    Args:
      dw, w (B, H, n, C, V) and starts, g_next (B, H, n, K, V): the backward walk's dW and G_{c+1} and the forward
        walk's W and chunk-start states S_c, in one dtype (the product dtype: bf16, f16 or f32); C, K, V powers of
        two >= 16.

    Returns:
      dWk, dKd (B, H, n, C, K) in the product dtype and da (B, H, n) float32.
    """
    batch, heads, num_chunks, chunk, v_dim = w.shape
    k_dim = starts.shape[-2]
    require_shapes(
        {
            "dw": (dw, w.shape),
            "starts": (starts, (batch, heads, num_chunks, k_dim, v_dim)),
            "g_next": (g_next, starts.shape),
        },
        "w and starts",
    )
    if not dw.dtype == starts.dtype == w.dtype == g_next.dtype:
        raise ValueError(
            f"dw, starts, w, g_next: expected one dtype, got {dw.dtype}, {starts.dtype}, {w.dtype}, {g_next.dtype}"
        )
    block_k = min(config.block_k, k_dim)
    row_blocks = k_dim // block_k

    # grid (K / block_k, B, H, n): a chunk's row-block programs launch together and share its dW and W tiles
    def tile(rows: int, by_row_block: bool) -> pl.BlockSpec:  # (B, H, n, rows, V) -> one (rows, V) tile
        return pl.BlockSpec((None, None, None, rows, v_dim), lambda r, b, h, c: (b, h, c, r if by_row_block else 0, 0))

    cotangent = pl.BlockSpec((None, None, None, chunk, block_k), lambda r, b, h, c: (b, h, c, 0, r))
    dwk, dkd, da = pl.pallas_call(
        functools.partial(_kernel, block_v=min(config.block_v, v_dim)),
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, k_dim), w.dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, k_dim), w.dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, row_blocks), jnp.float32),
        ],
        grid=(row_blocks, batch, heads, num_chunks),
        in_specs=[tile(chunk, False), tile(block_k, True), tile(chunk, False), tile(block_k, True)],
        out_specs=[
            cotangent,
            cotangent,
            pl.BlockSpec((None, None, None, None), lambda r, b, h, c: (b, h, c, r)),
        ],
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="gdn_walk_input_cotangents",
    )(dw, starts, w, g_next)
    return dwk, dkd, jnp.sum(da, axis=-1)
