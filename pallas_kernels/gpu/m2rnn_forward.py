"""Fused M2RNN forward kernel for NVIDIA GPUs (Pallas, Triton lowering).

One program per (sequence b, pack of P heads, block of state rows) runs the whole time loop with the pack's
block-diagonal W and its (rows, P*V) state block in registers (head packing: see ``m2rnn_common``). The inputs of step t+1 are loaded before step t's dependent chain (matmul, tanh,
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
    HeadPacking,
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
    packing: HeadPacking,
    rows: int,
    chunk_size: int,
    prefetch: int,
    numerics: StepNumerics,
):
    b, pack, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ids = row_slice(kb, rows)
    columns = row_slice(pack, packing.columns)
    start, end = sequence_bounds(cu_ref, b)
    input_refs = (q_ref, k_ref, v_ref, f_ref)
    acc = numerics.acc_dtype
    w_dot = w_ref[pack].astype(numerics.dot_dtype)
    last = jnp.maximum(end - 1, start)
    load = lambda t: step_inputs(input_refs, jnp.minimum(t, last), pack, row_ids, packing, acc)

    def emit(t, h_prev, z, h, q_t):
        y_ref[kb, t, columns] = jnp.sum(q_t * h, axis=0).astype(y_ref.dtype)

    def chunk(c, h):
        chunk_start = start + c * chunk_size
        if checkpoints_ref is not None:
            checkpoints_ref[chunk_offsets_ref[b] + c, pack, row_ids, :] = h.astype(checkpoints_ref.dtype)
        chunk_end = jnp.minimum(chunk_start + chunk_size, end)
        return walk_forward(chunk_start, chunk_end, h, w_dot, load, emit, numerics, prefetch)

    h = h0_ref[b, pack, row_ids, :].astype(acc)
    h = lax.fori_loop(0, cdiv(end - start, chunk_size), chunk, h)
    h_final_ref[b, pack, row_ids, :] = h.astype(h_final_ref.dtype)


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
    num_heads: int,
    num_chunks: int,
    config: KernelConfig,
    y_dtype: jnp.dtype,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Run the recurrence over packed sequences.

    Args:
      q (T, Nq, K), k (T, Nk, K), v (T, Nv * V), f (T, Nf): packed tokens, K and V powers of two >= 16, the
        heads of v flattened into its columns.
      w (G, P*V, P*V): block-diagonal state weights of the G = N_pad / P head packs (P = heads_per_program).
      h0 (B, G, K, P*V): initial states in the pack layout (column j of pack g is column j % V of head
        g * P + j // V), in the carry (state storage) dtype.
      num_heads: N, the real heads (N_pad = G * P >= N; padded heads are computed from head N - 1's inputs).
      cu_seqlens (B+1,) int32: sequence b covers tokens [cu_seqlens[b], cu_seqlens[b+1]).
      chunk_offsets (B+1,) int32 or None: index of sequence b's first checkpoint; None stores no checkpoints.
      num_chunks: number of checkpoint slots (>= chunk_offsets[-1]).
      y_dtype: dtype of y (use float32 when K is split over several programs: the caller sums the partials).

    Returns:
      y (K // rows, T, N_pad * V): per-row-block partial readouts (one block when block_k covers K),
      h_final (B, G, K, P*V) in h0's dtype,
      checkpoints (num_chunks, G, K, P*V) in h0's dtype, the state at the start of every chunk, or None.
    """
    tokens, k_dim = q.shape[0], q.shape[-1]
    batch, packs, _, columns = h0.shape
    rows = config.rows_per_program(k_dim)
    row_blocks = k_dim // rows
    numerics = StepNumerics.create(q.dtype, h0.dtype, config, interpret)
    packing = HeadPacking.create(num_heads, config.heads_per_program, columns, q, k, v, f)
    save = chunk_offsets is not None
    out_shape = [
        jax.ShapeDtypeStruct((row_blocks, tokens, packs * columns), y_dtype),
        jax.ShapeDtypeStruct(h0.shape, h0.dtype),
    ]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((num_chunks, packs, k_dim, columns), h0.dtype))
    else:
        chunk_offsets = jnp.zeros((batch + 1,), jnp.int32)
    kernel = functools.partial(
        _forward_kernel if save else _forward_kernel_without_checkpoints,
        packing=packing,
        rows=rows,
        chunk_size=config.chunk_size,
        prefetch=config.prefetch,
        numerics=numerics,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, packs, row_blocks),
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
