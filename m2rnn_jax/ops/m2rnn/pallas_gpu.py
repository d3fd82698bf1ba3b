"""The "pallas_gpu" backend: fused Pallas (Triton lowering) kernels for NVIDIA GPUs behind ``jax.custom_vjp``.

The kernels (``pallas_kernels.gpu``) work on packed tokens with K and V zero-padded to powers of two >= 16; this
module packs dense inputs ((B, S, ...) -> (B*S, ...) with uniform ``cu_seqlens``), pads, and wires the forward and
backward kernels into a custom VJP whose residuals are the inputs plus the forward's chunk checkpoints.

Zero padding is exact: padded rows of k and columns of v, W and h0 keep the padded state entries at tanh(0) = 0,
so they never feed the real entries, and their gradients are sliced away.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax.ops.heads import reduce_heads
from m2rnn_jax.ops.m2rnn.backends import register_backend
from m2rnn_jax.ops.m2rnn.validation import M2RNNShapes, resolve_shapes, state_dtypes
from pallas_kernels.gpu.m2rnn_backward import m2rnn_backward
from pallas_kernels.gpu.m2rnn_backward_gluon import m2rnn_backward_gluon
from pallas_kernels.gpu.m2rnn_common import KernelConfig, cdiv
from pallas_kernels.gpu.m2rnn_forward import m2rnn_forward
from pallas_kernels.gpu.m2rnn_forward_gluon import m2rnn_forward_gluon


def padded_size(n: int) -> int:
    """Smallest power of two >= max(n, 16): the feature sizes the Triton kernels accept."""
    return max(16, 1 << (n - 1).bit_length())


def default_config(batch: int, num_heads: int, k_dim: int) -> KernelConfig:
    """Launch parameters for a problem size.

    One program owns up to 64 state rows with two warps (32 rows each). When B*N is small (B=1 at the paper
    shape: 84 programs for 132 SMs) the rows are split over more programs, down to 16 rows and one warp, until
    there are ~2 programs per SM; y, dv and df then come as per-row-block partials summed outside the kernel.
    The Gluon forward (one warp per program) takes min(32, block_k) rows per program (H200 run 9), and the Gluon
    backward the same rows: since its shared-memory bank conflicts were removed it is faster than the Pallas-Triton
    backward both with many programs (B=8 at the paper shape: 8.73 vs 17.9 ms forward + backward) and with the rows
    split (B=1: 3.19 vs 4.39 ms; H200 run 26).
    """
    k_padded = padded_size(k_dim)
    block_k = min(k_padded, 64)
    while block_k > 16 and batch * num_heads * (k_padded // block_k) < 264:
        block_k //= 2
    return KernelConfig(
        block_k=block_k, num_warps=2 if block_k >= 64 else 1, gluon_rows=min(32, block_k), gluon_backward=True
    )


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable, non-differentiable parameters of one fused call."""

    config: KernelConfig
    num_chunks: int
    clip: float | None
    interpret: bool
    gluon_forward: bool = False
    gluon_backward: bool = False


def _chunk_offsets(cu_seqlens: jax.Array, chunk_size: int) -> jax.Array:
    """(B+1,) index of each sequence's first checkpoint: exclusive cumsum of ceil(len_b / chunk_size)."""
    lengths = jnp.diff(cu_seqlens)
    counts = cdiv(lengths, chunk_size).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def _sum_row_blocks(x: jax.Array) -> jax.Array:
    """Sum per-row-block partials over their leading axis (a reshape when there is one block)."""
    return x[0] if x.shape[0] == 1 else x.astype(jnp.float32).sum(axis=0)


def use_gluon_forward(
    *,
    dense: bool,
    interpret: bool,
    input_dtype: jnp.dtype,
    carry_dtype: jnp.dtype,
    k_padded: int,
    v_padded: int,
    tokens: int,
    num_heads: int,
    config: KernelConfig,
) -> bool:
    """Whether the forward runs the Gluon kernel (explicit register layouts) instead of the Pallas-Triton one.

    It covers the common case: dense inputs, bf16/f16 q/k/v, float32 state, padded K in {16, 32, 64, 128},
    padded V == 16, any head grouping, h0 given or not, offsets within int32, on a GPU (not interpret mode).
    Everything else (varlen, float32/float64 inputs, a bf16 state, larger K or V, interpret mode) keeps the
    Pallas-Triton forward.
    """
    return (
        config.gluon_forward
        and dense
        and not interpret
        and jnp.dtype(input_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and jnp.dtype(carry_dtype) == jnp.dtype(jnp.float32)
        and k_padded in (16, 32, 64, 128)
        and v_padded == 16
        and tokens * num_heads * max(k_padded, v_padded) <= _MAX_ELEMENTS
    )


def use_gluon_backward(*, gluon_forward: bool, config: KernelConfig) -> bool:
    """Whether the backward runs the Gluon kernel: in the case of the Gluon forward (``use_gluon_forward``: it
    reads that forward's checkpoints and recomputes with the same tanh), when ``config.gluon_backward`` is set.
    Everything else keeps the Pallas-Triton backward."""
    return gluon_forward and config.gluon_backward


def _gluon_tanh(config: KernelConfig) -> str:
    return "approx" if config.approx_tanh else config.gluon_tanh


def _run_forward(q, k, v, w, f, h0, cu_seqlens, static: _Static, save: bool):
    offsets = _chunk_offsets(cu_seqlens, static.config.chunk_size) if save else None
    if static.gluon_forward:
        y, h_final, checkpoints = m2rnn_forward_gluon(
            q,
            k,
            v,
            w,
            f,
            h0,
            chunk_size=static.config.chunk_size,
            save_checkpoints=save,
            rows=static.config.gluon_rows,
            tanh=_gluon_tanh(static.config),
        )
        return (y, h_final), (checkpoints, offsets)
    rows_split = static.config.rows_per_program(q.shape[-1]) < q.shape[-1]
    y, h_final, checkpoints = m2rnn_forward(
        q,
        k,
        v,
        w,
        f,
        h0,
        cu_seqlens,
        offsets,
        num_chunks=static.num_chunks,
        config=static.config,
        y_dtype=jnp.float32 if rows_split else q.dtype,
        interpret=static.interpret,
    )
    return (_sum_row_blocks(y).astype(q.dtype), h_final), (checkpoints, offsets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(q, k, v, w, f, h0, cu_seqlens, static: _Static):
    """Packed, padded inputs -> y (T, N, V) in q.dtype and h_final (B, N, K, V) in h0.dtype."""
    outputs, _ = _run_forward(q, k, v, w, f, h0, cu_seqlens, static, save=False)
    return outputs


def _fused_fwd(q, k, v, w, f, h0, cu_seqlens, static: _Static):
    outputs, (checkpoints, offsets) = _run_forward(q, k, v, w, f, h0, cu_seqlens, static, save=True)
    return outputs, (q, k, v, w, f, cu_seqlens, checkpoints, offsets)


def _fused_bwd(static: _Static, residuals, cotangents):
    q, k, v, w, f, cu_seqlens, checkpoints, offsets = residuals
    dy, dh_final = cotangents
    h0_dtype = checkpoints.dtype  # the forward stores checkpoints in the state's storage dtype
    acc = jnp.promote_types(h0_dtype, jnp.float32)
    if static.gluon_backward:
        k_dim = q.shape[-1]
        dq, dk, dv, df, dw, dh0 = m2rnn_backward_gluon(
            q,
            k,
            v,
            w,
            f,
            checkpoints,
            dy,
            dh_final.astype(acc),
            chunk_size=static.config.chunk_size,
            rows=min(static.config.gluon_rows or k_dim, k_dim),
            clip=static.clip,
            block=math.gcd(static.config.gluon_block, static.config.chunk_size),
            tanh=_gluon_tanh(static.config),
        )
    else:
        dq, dk, dv, df, dw, dh0 = _pallas_backward(
            q, k, v, w, f, cu_seqlens, checkpoints, offsets, dy, dh_final, static, h0_dtype, acc
        )
    grads = (
        reduce_heads(dq.astype(acc), q.shape[1], axis=1).astype(q.dtype),
        reduce_heads(dk.astype(acc), k.shape[1], axis=1).astype(k.dtype),
        reduce_heads(_sum_row_blocks(dv).astype(acc), v.shape[1], axis=1).astype(v.dtype),
        reduce_heads(dw.sum(axis=(0, 2)), w.shape[0], axis=0).astype(w.dtype),
        reduce_heads(_sum_row_blocks(df).astype(acc), f.shape[1], axis=1).astype(f.dtype),
        dh0.astype(h0_dtype),
        np.zeros(cu_seqlens.shape, jax.dtypes.float0),
    )
    return grads


def _pallas_backward(q, k, v, w, f, cu_seqlens, checkpoints, offsets, dy, dh_final, static: _Static, h0_dtype, acc):
    return m2rnn_backward(
        q,
        k,
        v,
        w,
        f,
        checkpoints,
        cu_seqlens,
        offsets,
        dy,
        dh_final.astype(acc),
        config=static.config,
        clip=static.clip,
        carry_dtype=h0_dtype,
        head_partial_dtype=q.dtype,
        row_partial_dtype=acc,
        interpret=static.interpret,
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


_MAX_ELEMENTS = 2**31 - 1  # the kernels index arrays with int32 offsets


def _check_index_range(tokens: int, num_heads: int, k_padded: int, v_padded: int, batch: int, static: _Static) -> None:
    """Raise ValueError when an array the kernels index would need offsets beyond int32."""
    config = static.config
    rows = config.rows_per_program(k_padded)
    sizes = {
        "per-head gradient partials (T, N, K)": tokens * num_heads * k_padded,
        "readout partials (K/block_k, T, N, V)": (k_padded // rows) * tokens * num_heads * v_padded,
        "checkpoints": static.num_chunks * num_heads * k_padded * v_padded,
        "recompute block starts": batch
        * num_heads
        * k_padded
        * v_padded
        * (config.chunk_size // config.recompute_block),
    }
    for what, size in sizes.items():
        if size > _MAX_ELEMENTS:
            raise ValueError(
                f"q: the pallas_gpu kernels index with int32 offsets; {what} would need {size} elements "
                f"(expected at most {_MAX_ELEMENTS}); split the batch or use backend='scan'"
            )


def _pad_to(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
    """Zero-pad axis a of x at its end to sizes[a]."""
    widths = [(0, sizes.get(axis, dim) - dim) for axis, dim in enumerate(x.shape)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def m2rnn_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    *,
    cu_seqlens: jax.Array | None,
    gradient_clipping: float | None,
    state_dtype: jnp.dtype,
    interpret: bool,
    shapes: M2RNNShapes | None = None,
    config: KernelConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The backend function (validated inputs, original head counts; see ``m2rnn_jax.ops.m2rnn.op.m2rnn``).

    ``shapes``: the sizes ``validate_inputs`` returned (None: validated here). ``config`` overrides the launch
    parameters chosen by :func:`default_config` (benchmarks use it).
    Returns y in q.dtype ((B, S, N, V) dense, (T, N, V) varlen) and h_final (B, N, K, V) in the state's
    storage dtype.
    """
    shapes = resolve_shapes(shapes, q, k, v, W, f, h0, cu_seqlens)
    batch, num_heads, k_dim, v_dim = shapes.batch, shapes.num_heads, shapes.k_dim, shapes.v_dim
    dense = not shapes.varlen
    if dense:
        seq_len = shapes.tokens
        q, k, v, f = (x.reshape((batch * seq_len,) + x.shape[2:]) for x in (q, k, v, f))
        cu_seqlens = jnp.arange(batch + 1, dtype=jnp.int32) * seq_len
    tokens = batch * shapes.tokens if dense else shapes.tokens  # packed tokens
    carry_dtype, _ = state_dtypes(state_dtype, q.dtype)
    config = config or default_config(batch, num_heads, k_dim)
    num_chunks = batch * cdiv(seq_len, config.chunk_size) if dense else tokens // config.chunk_size + batch
    kp, vp = padded_size(k_dim), padded_size(v_dim)
    gluon = use_gluon_forward(
        dense=dense,
        interpret=interpret,
        input_dtype=q.dtype,
        carry_dtype=carry_dtype,
        k_padded=kp,
        v_padded=vp,
        tokens=tokens,
        num_heads=num_heads,
        config=config,
    )
    static = _Static(
        config=config,
        num_chunks=max(num_chunks, 1),
        clip=gradient_clipping,
        interpret=interpret,
        gluon_forward=gluon,
        gluon_backward=use_gluon_backward(gluon_forward=gluon, config=config),
    )
    if h0 is None:
        h0 = jnp.zeros((batch, num_heads, k_dim, v_dim), carry_dtype)
    _check_index_range(tokens, num_heads, kp, vp, batch, static)
    y, h_final = _fused(
        _pad_to(q, {2: kp}),
        _pad_to(k, {2: kp}),
        _pad_to(v, {2: vp}),
        _pad_to(W, {1: vp, 2: vp}),
        f,
        _pad_to(h0.astype(carry_dtype), {2: kp, 3: vp}),
        cu_seqlens.astype(jnp.int32),
        static,
    )
    y, h_final = y[..., :v_dim], h_final[:, :, :k_dim, :v_dim]
    if dense:
        y = y.reshape(batch, seq_len, num_heads, v_dim)
    return y, h_final


register_backend("pallas_gpu", m2rnn_pallas_gpu)
