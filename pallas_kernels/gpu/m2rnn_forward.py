"""Fused M2RNN forward kernel for NVIDIA GPUs (Pallas, Triton lowering).

One program per (sequence b, output head n, block of state rows) runs the whole time loop with the head's W and
its state block in registers. The inputs of step t+1 are loaded before step t's dependent chain (matmul, tanh,
blend) so their latency hides behind it. Besides y and the final state, the kernel can store the state at the
start of every ``chunk_size`` steps: the checkpoints from which the backward kernel recomputes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.m2rnn_common import (
    HeadMap,
    KernelConfig,
    StepNumerics,
    cdiv,
    row_slice,
    sequence_bounds,
    step_inputs,
    walk_forward,
)


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    w_ref,
    f_ref,
    h0_ref,
    cu_ref,
    chunk_offsets_ref,
    y_ref,
    h_final_ref,
    checkpoints_ref,
    *,
    heads: HeadMap,
    rows: int,
    chunk_size: int,
    prefetch: int,
    numerics: StepNumerics,
):
    b, n, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ids = row_slice(kb, rows)
    start, end = sequence_bounds(cu_ref, b)
    input_refs = (q_ref, k_ref, v_ref, f_ref)
    acc = numerics.acc_dtype
    w_dot = w_ref[n // heads.w].astype(numerics.dot_dtype)
    last = jnp.maximum(end - 1, start)
    load = lambda t: step_inputs(input_refs, jnp.minimum(t, last), n, row_ids, heads, acc)

    def emit(t, h_prev, z, h, q_t):
        y_ref[kb, t, n, :] = jnp.sum(q_t[:, None] * h, axis=0).astype(y_ref.dtype)

    def chunk(c, h):
        chunk_start = start + c * chunk_size
        if checkpoints_ref is not None:
            checkpoints_ref[chunk_offsets_ref[b] + c, n, row_ids, :] = h.astype(checkpoints_ref.dtype)
        chunk_end = jnp.minimum(chunk_start + chunk_size, end)
        return walk_forward(chunk_start, chunk_end, h, w_dot, load, emit, numerics, prefetch)

    h = h0_ref[b, n, row_ids, :].astype(acc)
    h = lax.fori_loop(0, cdiv(end - start, chunk_size), chunk, h)
    h_final_ref[b, n, row_ids, :] = h.astype(h_final_ref.dtype)


def m2rnn_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    h0: jax.Array,
    cu_seqlens: jax.Array,
    chunk_offsets: jax.Array | None,
    *,
    num_chunks: int,
    config: KernelConfig,
    y_dtype: jnp.dtype,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Run the recurrence over packed sequences.

    Args:
      q (T, Nq, K), k (T, Nk, K), v (T, Nv, V), f (T, Nf): packed inputs, K and V powers of two >= 16.
      w (Nw, V, V): state weights. h0 (B, N, K, V): initial states, in the carry (state storage) dtype.
      cu_seqlens (B+1,) int32: sequence b covers tokens [cu_seqlens[b], cu_seqlens[b+1]).
      chunk_offsets (B+1,) int32 or None: index of sequence b's first checkpoint; None stores no checkpoints.
      num_chunks: number of checkpoint slots (>= chunk_offsets[-1]).
      y_dtype: dtype of y (use float32 when K is split over several programs: the caller sums the partials).

    Returns:
      y (K // rows, T, N, V): per-row-block partial readouts (one block when block_k covers K),
      h_final (B, N, K, V) in h0's dtype,
      checkpoints (num_chunks, N, K, V) in h0's dtype, the state at the start of every chunk, or None.
    """
    tokens, k_dim = q.shape[0], q.shape[-1]
    batch, num_heads, _, v_dim = h0.shape
    rows = config.rows_per_program(k_dim)
    row_blocks = k_dim // rows
    numerics = StepNumerics.create(q.dtype, h0.dtype, config, interpret)
    heads = HeadMap.create(num_heads, q, k, v, f, w)
    save = chunk_offsets is not None
    out_shape = [
        jax.ShapeDtypeStruct((row_blocks, tokens, num_heads, v_dim), y_dtype),
        jax.ShapeDtypeStruct(h0.shape, h0.dtype),
    ]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((num_chunks, num_heads, k_dim, v_dim), h0.dtype))
    else:
        chunk_offsets = jnp.zeros((batch + 1,), jnp.int32)
    kernel = functools.partial(
        _forward_kernel if save else _forward_kernel_without_checkpoints,
        heads=heads,
        rows=rows,
        chunk_size=config.chunk_size,
        prefetch=config.prefetch,
        numerics=numerics,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, num_heads, row_blocks),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="m2rnn_forward",
    )(q, k, v, w, f, h0, cu_seqlens.astype(jnp.int32), chunk_offsets.astype(jnp.int32))
    if save:
        return tuple(outs)
    return outs[0], outs[1], None


def _forward_kernel_without_checkpoints(*refs, **kwargs):
    *inputs_and_outputs, h_final_ref = refs
    return _forward_kernel(*inputs_and_outputs, h_final_ref, None, **kwargs)
