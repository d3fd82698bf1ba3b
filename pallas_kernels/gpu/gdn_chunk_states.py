"""The sequential part of the chunked gated delta rule and its outputs as fused NVIDIA GPU kernels (Pallas, Triton
lowering).

Per (sequence, head) the chunk-start states S_c (K, V) and the chunk outputs O_c (C, V) follow

    W_c = U_c - Wk_c S_c,    O_c = Qd_c S_c + QK_c W_c,    S_{c+1} = a_c S_c + Kd_cᵀ W_c            (forward)

and, walking back with G_{c+1} = dL/dS_{c+1} (G_n the cotangent of the final state) and dO_c the outputs' cotangent,

    dW_c = QK_cᵀ dO_c + Kd_c G_{c+1},    G_c = Qd_cᵀ dO_c + a_c G_{c+1} - Wk_cᵀ dW_c                 (backward)

Both recurrences are independent across the columns of the state, so one program owns a (K, block_v) column
block of one (sequence, head) and loops over the chunks with that block in registers (grid
(B H, V / block_v)). The output products (Qd_c S_c, QK_c W_c and, backward, their transposes against dO_c) are
taken inside the walk, so neither the output's float32 partial sums nor the chunk-start states' cotangent
(n, K, V) per head ever go through memory; the forward still writes W and the chunk-start states, which the
backward's parallel products (left to the caller) read. Products take the operands' dtype (bf16 / f16 / f32;
float32 at full precision) with float32 accumulation; the carried state is float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class StatesKernelConfig:
    """Launch parameters: columns of the state per program, Triton warps and software-pipeline stages."""

    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_v", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v: expected a power of two >= 16, got {self.block_v}")

    def compiler_params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _dot(a: jax.Array, b: jax.Array, *, transpose_a: bool = False) -> jax.Array:
    """a @ b (or aᵀ @ b) with a float32 accumulator; float32 operands at full precision."""
    dims = (((0,) if transpose_a else (1,), (0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _forward_kernel(
    u_ref,
    wk_ref,
    kd_ref,
    carry_ref,
    h0_ref,
    qd_ref,
    qk_ref,
    w_ref,
    starts_ref,
    o_ref,
    final_ref,
    *,
    num_chunks,
    block_v,
):
    bh, j = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * block_v, block_v)
    dot_dtype = wk_ref.dtype

    def chunk(c, state):
        start = state.astype(dot_dtype)
        starts_ref[bh, c, :, cols] = start.astype(starts_ref.dtype)
        w = (u_ref[bh, c, :, cols].astype(jnp.float32) - _dot(wk_ref[bh, c, :, :], start)).astype(dot_dtype)
        w_ref[bh, c, :, cols] = w.astype(w_ref.dtype)
        o = _dot(qd_ref[bh, c, :, :], start) + _dot(qk_ref[bh, c, :, :], w)
        o_ref[bh, c, :, cols] = o.astype(o_ref.dtype)
        return carry_ref[bh, c] * state + _dot(kd_ref[bh, c, :, :], w, transpose_a=True)

    state = lax.fori_loop(0, num_chunks, chunk, h0_ref[bh, :, cols].astype(jnp.float32))
    final_ref[bh, :, cols] = state.astype(final_ref.dtype)


def _backward_kernel(
    wk_ref, kd_ref, carry_ref, qd_ref, qk_ref, do_ref, dfinal_ref, dw_ref, g_next_ref, dh0_ref, *, num_chunks, block_v
):
    bh, j = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * block_v, block_v)
    dot_dtype = wk_ref.dtype

    def chunk(i, g):
        c = num_chunks - 1 - i
        g_next_ref[bh, c, :, cols] = g.astype(g_next_ref.dtype)
        do = do_ref[bh, c, :, cols].astype(dot_dtype)
        dw = _dot(qk_ref[bh, c, :, :], do, transpose_a=True) + _dot(kd_ref[bh, c, :, :], g.astype(dot_dtype))
        dw_ref[bh, c, :, cols] = dw.astype(dw_ref.dtype)
        back = _dot(wk_ref[bh, c, :, :], dw.astype(dot_dtype), transpose_a=True)
        return _dot(qd_ref[bh, c, :, :], do, transpose_a=True) + carry_ref[bh, c] * g - back

    g = lax.fori_loop(0, num_chunks, chunk, dfinal_ref[bh, :, cols].astype(jnp.float32))
    dh0_ref[bh, :, cols] = g.astype(dh0_ref.dtype)


def _flat(x: jax.Array) -> jax.Array:
    """(B, H, ...) -> (B H, ...)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _grid(v_dim: int, config: StatesKernelConfig, batch_heads: int) -> tuple[tuple[int, int], int]:
    block_v = min(config.block_v, v_dim)
    return (batch_heads, v_dim // block_v), block_v


def chunk_states_forward(
    U: jax.Array,
    Wk: jax.Array,
    Kd: jax.Array,
    carry: jax.Array,
    h0: jax.Array,
    Qd: jax.Array,
    QK: jax.Array,
    *,
    out_dtype: jnp.dtype,
    config: StatesKernelConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The forward walk over chunks and the chunk outputs.

    Args:
      U (B, H, n, C, V), Wk, Kd, Qd (B, H, n, C, K), QK (B, H, n, C, C): chunk factors, one dtype (the product
        dtype); C, K, V powers of two >= 16. carry (B, H, n) float32; h0 (B, H, K, V) float32.
      out_dtype: the dtype O is written in.

    Returns:
      O (B, H, n, C, V) in ``out_dtype``; W (B, H, n, C, V) and the chunk-start states (B, H, n, K, V) in the
      product dtype; the final state (B, H, K, V) float32.
    """
    batch, heads, num_chunks, chunk, v_dim = U.shape
    k_dim = Wk.shape[-1]
    grid, block_v = _grid(v_dim, config, batch * heads)
    bh = batch * heads
    w, starts, o, final = pl.pallas_call(
        functools.partial(_forward_kernel, num_chunks=num_chunks, block_v=block_v),
        out_shape=[
            jax.ShapeDtypeStruct((bh, num_chunks, chunk, v_dim), U.dtype),
            jax.ShapeDtypeStruct((bh, num_chunks, k_dim, v_dim), U.dtype),
            jax.ShapeDtypeStruct((bh, num_chunks, chunk, v_dim), out_dtype),
            jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32),
        ],
        grid=grid,
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="gdn_chunk_states_forward",
    )(
        _flat(U),
        _flat(Wk),
        _flat(Kd),
        _flat(carry.astype(jnp.float32)),
        _flat(h0.astype(jnp.float32)),
        _flat(Qd),
        _flat(QK),
    )
    return (
        o.reshape(U.shape),
        w.reshape(U.shape),
        starts.reshape(batch, heads, num_chunks, k_dim, v_dim),
        final.reshape(batch, heads, k_dim, v_dim),
    )


def chunk_states_backward(
    Wk: jax.Array,
    Kd: jax.Array,
    carry: jax.Array,
    Qd: jax.Array,
    QK: jax.Array,
    dO: jax.Array,
    dfinal: jax.Array,
    *,
    config: StatesKernelConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward walk over chunks.

    Args:
      Wk, Kd, Qd (B, H, n, C, K), QK (B, H, n, C, C) in the product dtype, carry (B, H, n) float32, and the
      cotangents of the forward's results: dO (B, H, n, C, V) (any float dtype: read in the product dtype),
      dfinal (B, H, K, V).

    Returns:
      dW (B, H, n, C, V) (the cotangent of W, through the outputs and the states) and G_{c+1} (B, H, n, K, V) (the
      cotangent of the state leaving chunk c) in the product dtype, dh0 (B, H, K, V) float32.
    """
    batch, heads, num_chunks, chunk, k_dim = Wk.shape
    v_dim = dO.shape[-1]
    grid, block_v = _grid(v_dim, config, batch * heads)
    bh = batch * heads
    dw, g_next, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, num_chunks=num_chunks, block_v=block_v),
        out_shape=[
            jax.ShapeDtypeStruct((bh, num_chunks, chunk, v_dim), Wk.dtype),
            jax.ShapeDtypeStruct((bh, num_chunks, k_dim, v_dim), Wk.dtype),
            jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32),
        ],
        grid=grid,
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="gdn_chunk_states_backward",
    )(
        _flat(Wk),
        _flat(Kd),
        _flat(carry.astype(jnp.float32)),
        _flat(Qd),
        _flat(QK),
        _flat(dO),
        _flat(dfinal.astype(jnp.float32)),
    )
    return (
        dw.reshape(batch, heads, num_chunks, chunk, v_dim),
        g_next.reshape(batch, heads, num_chunks, k_dim, v_dim),
        dh0.reshape(batch, heads, k_dim, v_dim),
    )
