"""The output stage of the chunked gated delta rule and its backward as NVIDIA GPU kernels (Pallas, Triton lowering).

Per (sequence, head, chunk c), from the chunk-local factors Qd_c (C, K), QK_c (C, C) and the walk's chunk-start
state S_c (K, V) and new values W_c (C, V):

    O_c = Qd_c S_c + QK_c W_c                                                               (forward)

    dS_c^ext = Qd_cᵀ dO_c,   dW_c^ext = QK_cᵀ dO_c                   (state cotangents, the backward walk's inputs)
    dQd_c = dO_c S_cᵀ,       dQK_c = dO_c W_cᵀ                      (factor cotangents, the local stage's inputs)

XLA ran these as six batched products over 64-row matrices (the forward two with float32 results, then their sum
and rounding; session 21's H100 profile of the 400M 1L hybrid: 14.6 ms of the 257 ms step). Here the forward is
one kernel that sums both products in one float32 accumulator and writes O once in the output dtype; the backward
is two kernels, one per kind of cotangent, each reading dO once. O is written, and dO read, in the token-major
(B, n, C, H, V) layout of the op's (B, S, H, V) output split into chunks, so neither needs a transpose from
heads-first. Products take the factors' dtype as operands (QK, float32, is rounded to it as XLA's products did)
with a float32 accumulator; float32 operands at full precision.

Grids: forward and state cotangents (V / block_v, B, H, n), one (C or K, block_v) column block a program, the
column blocks of a chunk launched together (they share its Qd and QK tiles through the cache); factor cotangents
(B, H, n), a loop over the column blocks accumulating dQd (C, K) and dQK (C, C) in registers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.gdn_chunk_states import StatesKernelConfig, require_shapes
from pallas_kernels.gpu.unit_lower_inverse import dot, operand_precision


@dataclasses.dataclass(frozen=True)
class OutputsKernelConfig(StatesKernelConfig):
    """Launch parameters of one of the three kernels (the walk's fields and checks): columns of V per block,
    Triton warps and pipeline stages."""

    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 1


# the fastest of gdn_check.py's launch sweep for each kernel at B=8, S=4096, H=2, C=64, K=256, V=512 bf16 on an H200
# (session 26, experiments/RESULTS.md): forward 0.392 ms (64/8/1: 0.433), state cotangents 0.396 ms (64/8/1:
# 0.417), factor cotangents 0.313 ms (the next, 64/4/2: 0.344)
DEFAULT_FORWARD_CONFIG = OutputsKernelConfig(block_v=128, num_warps=4, num_stages=1)
DEFAULT_STATE_COTANGENTS_CONFIG = OutputsKernelConfig(block_v=128, num_warps=4, num_stages=1)
DEFAULT_FACTOR_COTANGENTS_CONFIG = OutputsKernelConfig(block_v=64, num_warps=8, num_stages=2)


def _forward_kernel(qd_ref, qk_ref, s_ref, w_ref, o_ref):
    dot_dtype = qd_ref.dtype
    exact = operand_precision(dot_dtype)
    o = dot(qd_ref[...], s_ref[...], exact) + dot(qk_ref[...].astype(dot_dtype), w_ref[...], exact)
    o_ref[...] = o.astype(o_ref.dtype)


def _state_cotangents_kernel(qd_ref, qk_ref, do_ref, ds_ref, dw_ref):
    dot_dtype = qd_ref.dtype
    exact = operand_precision(dot_dtype)
    do = do_ref[...].astype(dot_dtype)
    ds_ref[...] = dot(qd_ref[...], do, exact, transpose_a=True).astype(ds_ref.dtype)
    dw_ref[...] = dot(qk_ref[...].astype(dot_dtype), do, exact, transpose_a=True).astype(dw_ref.dtype)


def _factor_cotangents_kernel(do_ref, s_ref, w_ref, dqd_ref, dqk_ref, *, block_v: int):
    dot_dtype = s_ref.dtype
    exact = operand_precision(dot_dtype)

    def column_block(j, sums):
        dqd, dqk = sums
        cols = pl.ds(pl.multiple_of(j * block_v, block_v), block_v)
        do = do_ref[:, cols].astype(dot_dtype)
        dqd = dqd + dot(do, s_ref[:, cols], exact, transpose_b=True)
        dqk = dqk + dot(do, w_ref[:, cols], exact, transpose_b=True)
        return dqd, dqk

    chunk, k_dim = dqd_ref.shape
    zeros = (jnp.zeros((chunk, k_dim), jnp.float32), jnp.zeros((chunk, chunk), jnp.float32))
    dqd, dqk = lax.fori_loop(0, s_ref.shape[-1] // block_v, column_block, zeros)
    dqd_ref[...] = dqd.astype(dqd_ref.dtype)
    dqk_ref[...] = dqk.astype(dqk_ref.dtype)


def _check(Qd: jax.Array, QK: jax.Array, starts: jax.Array, w: jax.Array) -> tuple[int, ...]:
    """(B, H, n, C, K, V) of consistent factors, else ValueError naming the argument."""
    batch, heads, num_chunks, chunk, k_dim = Qd.shape
    v_dim = w.shape[-1]
    expected = {
        "QK": (QK, (batch, heads, num_chunks, chunk, chunk)),
        "starts": (starts, (batch, heads, num_chunks, k_dim, v_dim)),
        "w": (w, (batch, heads, num_chunks, chunk, v_dim)),
    }
    require_shapes(expected, f"Qd {tuple(Qd.shape)} and w")
    if not Qd.dtype == starts.dtype == w.dtype:
        raise ValueError(f"Qd, starts, w: expected one dtype, got {Qd.dtype}, {starts.dtype}, {w.dtype}")
    return batch, heads, num_chunks, chunk, k_dim, v_dim


def _grid_ids(ids: tuple) -> tuple:
    """(column block, sequence, head, chunk) from the grid indices: (V / block_v, B, H, n) (column blocks first,
    so that a chunk's column-block programs run next to each other and share its (C, K) and (C, C) tiles through the
    cache; Pallas launches the first grid axis fastest) or (B, H, n) (column block 0)."""
    return (ids[0], *ids[1:]) if len(ids) == 4 else (0, *ids)


def _heads_first(*shape: int, by_columns: bool = False) -> pl.BlockSpec:
    """(B, H, n, *shape) -> the ``shape`` tile of (sequence, head, chunk): the column block's tile if
    ``by_columns``, else the whole trailing dims."""

    def index(*ids):
        j, b, h, c = _grid_ids(ids)
        return (b, h, c) + (0,) * (len(shape) - 1) + (j if by_columns else 0,)

    return pl.BlockSpec((None, None, None, *shape), index)


def _token_major(chunk: int, width: int) -> pl.BlockSpec:
    """(B, n, C, H, V) -> the (C, width) tile of (sequence, head, chunk) and the grid's column block (if any)."""

    def index(*ids):
        j, b, h, c = _grid_ids(ids)
        return (b, c, 0, h, j)

    return pl.BlockSpec((None, None, chunk, None, width), index)


def chunk_outputs_forward(
    Qd: jax.Array,
    QK: jax.Array,
    starts: jax.Array,
    w: jax.Array,
    *,
    out_dtype: jnp.dtype,
    config: OutputsKernelConfig = DEFAULT_FORWARD_CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """O_c = Qd_c S_c + QK_c W_c of every chunk.

    Args:
      Qd (B, H, n, C, K), starts (B, H, n, K, V), w (B, H, n, C, V): in one dtype (the product dtype: bf16, f16 or
        f32); QK (B, H, n, C, C) float32 (rounded to the product dtype for its product); C, K, V powers of two >= 16.
      out_dtype: O's dtype.

    Returns:
      O (B, n, C, H, V) in ``out_dtype``: token-major, the (B, S, H, V) output split into chunks.
    """
    batch, heads, num_chunks, chunk, k_dim, v_dim = _check(Qd, QK, starts, w)
    block_v = min(config.block_v, v_dim)
    return pl.pallas_call(
        _forward_kernel,
        out_shape=jax.ShapeDtypeStruct((batch, num_chunks, chunk, heads, v_dim), out_dtype),
        grid=(v_dim // block_v, batch, heads, num_chunks),
        in_specs=[
            _heads_first(chunk, k_dim),
            _heads_first(chunk, chunk),
            _heads_first(k_dim, block_v, by_columns=True),
            _heads_first(chunk, block_v, by_columns=True),
        ],
        out_specs=_token_major(chunk, block_v),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="gdn_chunk_outputs_forward",
    )(Qd, QK.astype(jnp.float32), starts, w)


def chunk_outputs_backward(
    Qd: jax.Array,
    QK: jax.Array,
    starts: jax.Array,
    w: jax.Array,
    do: jax.Array,
    *,
    state_config: OutputsKernelConfig = DEFAULT_STATE_COTANGENTS_CONFIG,
    factor_config: OutputsKernelConfig = DEFAULT_FACTOR_COTANGENTS_CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The cotangents of :func:`chunk_outputs_forward`'s inputs from dO.

    Args:
      Qd, QK, starts, w: as :func:`chunk_outputs_forward`.
      do: (B, n, C, H, V) the cotangent of O (any float dtype; rounded to the product dtype, as XLA's products
        rounded it).

    Returns:
      dQd (B, H, n, C, K), dQK (B, H, n, C, C), dstarts (B, H, n, K, V), dw (B, H, n, C, V), each in its input's
      dtype (dQK float32, from the float32 accumulator).
    """
    batch, heads, num_chunks, chunk, k_dim, v_dim = _check(Qd, QK, starts, w)
    if tuple(do.shape) != (batch, num_chunks, chunk, heads, v_dim):
        raise ValueError(
            f"do: expected shape (B, n, C, H, V) = {(batch, num_chunks, chunk, heads, v_dim)}, got {tuple(do.shape)}"
        )
    block_v = min(state_config.block_v, v_dim)
    dstarts, dw = pl.pallas_call(
        _state_cotangents_kernel,
        out_shape=[jax.ShapeDtypeStruct(starts.shape, starts.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype)],
        grid=(v_dim // block_v, batch, heads, num_chunks),
        in_specs=[_heads_first(chunk, k_dim), _heads_first(chunk, chunk), _token_major(chunk, block_v)],
        out_specs=[_heads_first(k_dim, block_v, by_columns=True), _heads_first(chunk, block_v, by_columns=True)],
        compiler_params=state_config.compiler_params(),
        interpret=interpret,
        name="gdn_chunk_outputs_state_cotangents",
    )(Qd, QK.astype(jnp.float32), do)
    dqd, dqk = pl.pallas_call(
        functools.partial(_factor_cotangents_kernel, block_v=min(factor_config.block_v, v_dim)),
        out_shape=[jax.ShapeDtypeStruct(Qd.shape, Qd.dtype), jax.ShapeDtypeStruct(QK.shape, jnp.float32)],
        grid=(batch, heads, num_chunks),
        in_specs=[_token_major(chunk, v_dim), _heads_first(k_dim, v_dim), _heads_first(chunk, v_dim)],
        out_specs=[_heads_first(chunk, k_dim), _heads_first(chunk, chunk)],
        compiler_params=factor_config.compiler_params(),
        interpret=interpret,
        name="gdn_chunk_outputs_factor_cotangents",
    )(do, starts, w)
    return dqd, dqk.astype(QK.dtype), dstarts, dw
