"""The sequential part of the chunked gated delta rule as fused NVIDIA GPU kernels (Pallas, Triton lowering).

Per (sequence, head) the chunk-start states S_c (K, V) follow

    W_c = U_c - Wk_c S_c,        S_{c+1} = a_c S_c + Kd_cᵀ W_c                          (forward)

and, walking back with G_{c+1} = dL/dS_{c+1} (G_n the cotangent of the final state),

    dW_c = dW_c^ext + Kd_c G_{c+1},    G_c = dS_c^ext + a_c G_{c+1} - Wk_cᵀ dW_c            (backward)

Both recurrences are independent across the columns of the state, so one program owns a (K, block_v) column
block of one (sequence, head) and loops over the chunks with that block in registers (grid
(B H, V / block_v)). The backward loads chunk c - 1's external cotangents while it works on chunk c. Products take
the operands' dtype (bf16 / f16 / f32; float32 at full precision) with float32 accumulation; the carried state is
float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu.unit_lower_inverse import operand_precision


def require_shapes(expected: dict[str, tuple[jax.Array, tuple[int, ...]]], source: str) -> None:
    """ValueError ``"{name}: expected shape {shape} (from {source}), got {x.shape}"`` for the first array of
    ``expected`` (name -> (array, shape)) whose shape differs; the GDN kernels' input checks."""
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)} (from {source}), got {tuple(x.shape)}")


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


@dataclasses.dataclass(frozen=True)
class TiledKernelConfig(StatesKernelConfig):
    """Launch parameters of the GDN kernels that also tile K: rows of K per block (``block_k``) besides the walk's
    fields (the chunk-local backward, the walk's input cotangents)."""

    block_k: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_k, int) or self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k: expected a power of two >= 16, got {self.block_k!r}")


def _dot(a: jax.Array, b: jax.Array, *, transpose_a: bool = False) -> jax.Array:
    """a @ b (or aᵀ @ b) with a float32 accumulator; float32 operands at full precision."""
    dims = (((0,) if transpose_a else (1,), (0,)), ((), ()))
    precision = operand_precision(a.dtype)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _forward_kernel(u_ref, wk_ref, kd_ref, carry_ref, h0_ref, w_ref, starts_ref, final_ref, *, num_chunks, block_v):
    bh, j = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * block_v, block_v)
    dot_dtype = wk_ref.dtype

    def chunk(c, state):
        starts_ref[bh, c, :, cols] = state.astype(starts_ref.dtype)
        w = u_ref[bh, c, :, cols].astype(jnp.float32) - _dot(wk_ref[bh, c, :, :], state.astype(dot_dtype))
        w_ref[bh, c, :, cols] = w.astype(w_ref.dtype)
        update = _dot(kd_ref[bh, c, :, :], w.astype(dot_dtype), transpose_a=True)
        return carry_ref[bh, c] * state + update

    state = lax.fori_loop(0, num_chunks, chunk, h0_ref[bh, :, cols].astype(jnp.float32))
    final_ref[bh, :, cols] = state.astype(final_ref.dtype)


def _backward_kernel(
    wk_ref, kd_ref, carry_ref, dw_ext_ref, dstarts_ref, dfinal_ref, dw_ref, g_next_ref, dh0_ref, *, num_chunks, block_v
):
    bh, j = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * block_v, block_v)
    dot_dtype = wk_ref.dtype

    def external(c):
        """dW_c^ext (C, block_v) and dS_c^ext (K, block_v): loaded one chunk ahead of their use, so that their
        latency overlaps the previous chunk's products instead of stalling the walk."""
        return dw_ext_ref[bh, c, :, cols], dstarts_ref[bh, c, :, cols]

    def chunk(i, walk):
        g, (dw_ext, dstart) = walk
        c = num_chunks - 1 - i
        ahead = external(jnp.maximum(c - 1, 0))
        g_next_ref[bh, c, :, cols] = g.astype(g_next_ref.dtype)
        dw = dw_ext.astype(jnp.float32) + _dot(kd_ref[bh, c, :, :], g.astype(dot_dtype))
        dw_ref[bh, c, :, cols] = dw.astype(dw_ref.dtype)
        back = _dot(wk_ref[bh, c, :, :], dw.astype(dot_dtype), transpose_a=True)
        return dstart.astype(jnp.float32) + carry_ref[bh, c] * g - back, ahead

    g, _ = lax.fori_loop(0, num_chunks, chunk, (dfinal_ref[bh, :, cols].astype(jnp.float32), external(num_chunks - 1)))
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
    *,
    config: StatesKernelConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward walk over chunks.

    Args:
      U (B, H, n, C, V), Wk, Kd (B, H, n, C, K): chunk factors, one dtype (the product dtype); C, K, V powers of
        two >= 16. carry (B, H, n) float32; h0 (B, H, K, V) float32.

    Returns:
      W (B, H, n, C, V) and the chunk-start states (B, H, n, K, V) in the product dtype, the final state
      (B, H, K, V) float32.
    """
    batch, heads, num_chunks, chunk, v_dim = U.shape
    k_dim = Wk.shape[-1]
    grid, block_v = _grid(v_dim, config, batch * heads)
    bh = batch * heads
    w, starts, final = pl.pallas_call(
        functools.partial(_forward_kernel, num_chunks=num_chunks, block_v=block_v),
        out_shape=[
            jax.ShapeDtypeStruct((bh, num_chunks, chunk, v_dim), U.dtype),
            jax.ShapeDtypeStruct((bh, num_chunks, k_dim, v_dim), U.dtype),
            jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32),
        ],
        grid=grid,
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="gdn_chunk_states_forward",
    )(_flat(U), _flat(Wk), _flat(Kd), _flat(carry.astype(jnp.float32)), _flat(h0.astype(jnp.float32)))
    return (
        w.reshape(U.shape),
        starts.reshape(batch, heads, num_chunks, k_dim, v_dim),
        final.reshape(batch, heads, k_dim, v_dim),
    )


def chunk_states_backward(
    Wk: jax.Array,
    Kd: jax.Array,
    carry: jax.Array,
    dw_ext: jax.Array,
    dstarts: jax.Array,
    dfinal: jax.Array,
    *,
    config: StatesKernelConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward walk over chunks.

    Args:
      Wk, Kd (B, H, n, C, K) in the product dtype, carry (B, H, n) float32, and the cotangents of the forward's
      results: dw_ext (B, H, n, C, V), dstarts (B, H, n, K, V), dfinal (B, H, K, V).

    Returns:
      dW (B, H, n, C, V) (the full cotangent of W: external plus through the states) and G_{c+1} (B, H, n, K, V)
      (the cotangent of the state leaving chunk c) in the product dtype, dh0 (B, H, K, V) float32.
    """
    batch, heads, num_chunks, chunk, k_dim = Wk.shape
    v_dim = dw_ext.shape[-1]
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
    )(_flat(Wk), _flat(Kd), _flat(carry.astype(jnp.float32)), _flat(dw_ext), _flat(dstarts), _flat(dfinal))
    return (
        dw.reshape(batch, heads, num_chunks, chunk, v_dim),
        g_next.reshape(batch, heads, num_chunks, k_dim, v_dim),
        dh0.reshape(batch, heads, k_dim, v_dim),
    )
