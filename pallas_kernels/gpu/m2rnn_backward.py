"""Fused M2RNN backward kernel for NVIDIA GPUs (Pallas, Triton lowering).

One program per (sequence b, output head n, block of state rows) sweeps the chunks of its sequence in reverse.
For each chunk it restarts from the forward's checkpoint and walks the chunk once, storing the state at the start
of every ``recompute_block`` steps (a few KB per program, read back soon after, so it stays in L2). Then, block by
block in reverse, it recomputes the block's states into registers (the block is unrolled statically) and walks
its steps backward, recomputing Z_t, with the math of SPEC §4.1 and the clipping placement of SPEC §0.1:

    dq_t = H_t dy_t                      R <- clamp(R)        G = q_t dy_t^T + R
    df_t = sum(G * (H_{t-1} - Z_t))      dP = (1 - f_t) G * (1 - Z_t^2)
    dW  += H_{t-1}^T dP                  dv_t = dP^T k_t      dk_t = dP v_t
    R   <- f_t G + dP W^T                (after the first step of the sequence: dh0 = R, unclamped)

Per time step that is three evaluations of the recurrence (chunk walk, block recompute, reverse step) and no
per-step state traffic through memory. Memory beyond inputs and gradients: the checkpoints,
B N K V (S / chunk_size) floats, plus B N K V (chunk_size / recompute_block) floats of block starts. Gradients of
broadcast heads are written per output head and of split rows per row block; the caller sums them (no atomics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu.m2rnn_common import (
    HeadMap,
    KernelConfig,
    StepNumerics,
    blend,
    cdiv,
    recurrence_step,
    row_slice,
    sequence_bounds,
    step_inputs,
    walk_forward,
)


def _block_barrier(interpret: bool) -> None:
    """Order this program's global-buffer writes before its reads (and reads before the next writes)."""
    if not interpret:
        pltriton.debug_barrier()


def _backward_kernel(
    q_ref,
    k_ref,
    v_ref,
    w_ref,
    f_ref,
    checkpoints_ref,
    cu_ref,
    chunk_offsets_ref,
    dy_ref,
    dh_final_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    df_ref,
    dw_ref,
    dh0_ref,
    block_starts_ref,
    *,
    heads: HeadMap,
    rows: int,
    chunk_size: int,
    recompute_block: int,
    prefetch: int,
    clip: float | None,
    numerics: StepNumerics,
    interpret: bool,
):
    b, n, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ids = row_slice(kb, rows)
    start, end = sequence_bounds(cu_ref, b)
    acc = numerics.acc_dtype
    input_refs = (q_ref, k_ref, v_ref, f_ref)
    w = w_ref[n // heads.w]
    w_dot = w.astype(numerics.dot_dtype)
    w_t_dot = w.T.astype(numerics.dot_dtype)
    last = jnp.maximum(end - 1, start)
    load = lambda t: step_inputs(input_refs, jnp.minimum(t, last), n, row_ids, heads, acc)

    def backward_step(t, h_prev, z, inputs, dy_t, carry):
        r, dw = carry
        q_t, k_t, v_t, f_t = inputs
        h = blend(h_prev, z, f_t, numerics)
        dq_ref[t, n, row_ids] = jnp.sum(h * dy_t[None, :], axis=1).astype(dq_ref.dtype)
        if clip is not None:
            r = jnp.clip(r, -clip, clip)
        g = q_t[:, None] * dy_t[None, :] + r
        df_ref[kb, t, n] = jnp.sum(g * (h_prev - z)).astype(df_ref.dtype)
        dp = (1 - f_t) * g * (1 - z * z)
        dw = dw + numerics.outer_matmul(h_prev, dp)
        dv_ref[kb, t, n, :] = jnp.sum(k_t[:, None] * dp, axis=0).astype(dv_ref.dtype)
        dk_ref[t, n, row_ids] = jnp.sum(dp * v_t[None, :], axis=1).astype(dk_ref.dtype)
        r = f_t * g + numerics.matmul(dp, w_t_dot)
        return r, dw

    def block_inputs(block_start):
        """Everything a block reads besides its start state: per step (q, k, v, f) and dy."""
        steps = [jnp.minimum(block_start + s, last) for s in range(recompute_block)]
        return tuple(load(t) for t in steps), tuple(dy_ref[t, n, :].astype(acc) for t in steps)

    def block_backward(block_start, block_len, h, inputs, carry):
        """Steps [block_start, block_start + block_len), block_len <= recompute_block, from the state h before
        them: recompute their states and Z into registers (a statically unrolled block), then walk back."""
        loaded, dys = inputs
        states, zs = [], []
        for s in range(recompute_block):
            _, k_t, v_t, f_t = loaded[s]
            states.append(h)
            z, h = recurrence_step(h, w_dot, k_t, v_t, f_t, numerics)
            zs.append(z)
        for s in reversed(range(recompute_block)):
            step = functools.partial(backward_step, block_start + s, states[s], zs[s], loaded[s], dys[s])
            carry = lax.cond(s < block_len, step, lambda c: c, carry)
        return carry

    def chunk(i, carry):
        c = cdiv(end - start, chunk_size) - 1 - i
        chunk_start = start + c * chunk_size
        chunk_len = jnp.minimum(chunk_size, end - chunk_start)
        num_blocks = cdiv(chunk_len, recompute_block)
        last_block_start = chunk_start + (num_blocks - 1) * recompute_block

        def store_block_start(t, h_prev, z, h_new, q_t):
            offset = t - chunk_start

            @pl.when(offset % recompute_block == 0)
            def _():
                block_starts_ref[b, n, kb, offset // recompute_block] = h_prev.astype(block_starts_ref.dtype)

        h = checkpoints_ref[chunk_offsets_ref[b] + c, n, row_ids, :].astype(acc)
        h = walk_forward(chunk_start, last_block_start, h, w_dot, load, store_block_start, numerics, prefetch)
        block_starts_ref[b, n, kb, num_blocks - 1] = h.astype(block_starts_ref.dtype)
        _block_barrier(interpret)

        def block_data(j):
            h_start = block_starts_ref[b, n, kb, j].astype(acc)
            return h_start, block_inputs(chunk_start + j * recompute_block)

        def block(jj, state):
            carry, (h_start, inputs) = state
            j = num_blocks - 1 - jj
            upcoming = block_data(jnp.maximum(j - 1, 0))  # the next block's loads fly during this block
            block_start = chunk_start + j * recompute_block
            block_len = jnp.minimum(recompute_block, chunk_start + chunk_len - block_start)
            return block_backward(block_start, block_len, h_start, inputs, carry), upcoming

        carry, _ = lax.fori_loop(0, num_blocks, block, (carry, block_data(num_blocks - 1)))
        _block_barrier(interpret)
        return carry

    r = dh_final_ref[b, n, row_ids, :].astype(acc)
    dw = jnp.zeros(w.shape, acc)
    r, dw = lax.fori_loop(0, cdiv(end - start, chunk_size), chunk, (r, dw))
    dh0_ref[b, n, row_ids, :] = r.astype(dh0_ref.dtype)
    dw_ref[b, n, kb] = dw.astype(dw_ref.dtype)


def m2rnn_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    checkpoints: jax.Array,
    cu_seqlens: jax.Array,
    chunk_offsets: jax.Array,
    dy: jax.Array,
    dh_final: jax.Array,
    *,
    config: KernelConfig,
    clip: float | None,
    carry_dtype: jnp.dtype,
    head_partial_dtype: jnp.dtype,
    row_partial_dtype: jnp.dtype,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Gradients of the recurrence, given the forward's checkpoints.

    Args:
      q (T, Nq, K), k (T, Nk, K), v (T, Nv, V), w (Nw, V, V), f (T, Nf), cu_seqlens (B+1,): as for the forward.
      checkpoints (num_chunks, N, K, V), chunk_offsets (B+1,): from ``m2rnn_forward`` with the same config.
      dy (T, N, V): cotangent of y. dh_final (B, N, K, V): cotangent of the final states.
      clip: None or c >= 0, the state-cotangent clamp of SPEC §0.1.
      carry_dtype: the state storage dtype used by the forward (the recomputation rounds to it likewise).
      head_partial_dtype: dtype of dq, dk (per output head) and dv (per output head and row block).
      row_partial_dtype: dtype of df (per row block).

    Returns:
      dq (T, N, K), dk (T, N, K): per output head; sum each block of N // Nq (N // Nk) heads for the source head.
      dv (R, T, N, V), df (R, T, N): per row block (R = K // rows) and output head.
      dW (B, N, R, V, V) float32: per sequence, output head and row block.
      dh0 (B, N, K, V) float32.
    """
    tokens, k_dim = q.shape[0], q.shape[-1]
    batch, num_heads, _, v_dim = dh_final.shape
    rows = config.rows_per_program(k_dim)
    row_blocks = k_dim // rows
    numerics = StepNumerics.create(q.dtype, carry_dtype, config, interpret)
    heads = HeadMap.create(num_heads, q, k, v, f, w)
    acc = numerics.acc_dtype
    programs = (batch, num_heads, row_blocks)
    out_shape = (
        jax.ShapeDtypeStruct((tokens, num_heads, k_dim), head_partial_dtype),
        jax.ShapeDtypeStruct((tokens, num_heads, k_dim), head_partial_dtype),
        jax.ShapeDtypeStruct((row_blocks, tokens, num_heads, v_dim), head_partial_dtype),
        jax.ShapeDtypeStruct((row_blocks, tokens, num_heads), row_partial_dtype),
        jax.ShapeDtypeStruct(programs + (v_dim, v_dim), jnp.float32),
        jax.ShapeDtypeStruct(dh_final.shape, jnp.float32),
        jax.ShapeDtypeStruct(programs + (config.chunk_size // config.recompute_block, rows, v_dim), acc),
    )
    kernel = functools.partial(
        _backward_kernel,
        heads=heads,
        rows=rows,
        chunk_size=config.chunk_size,
        recompute_block=config.recompute_block,
        prefetch=config.prefetch,
        clip=clip,
        numerics=numerics,
        interpret=interpret,
    )
    dq, dk, dv, df, dw, dh0, _ = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=programs,
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="m2rnn_backward",
    )(q, k, v, w, f, checkpoints, cu_seqlens, chunk_offsets, dy, dh_final)
    return dq, dk, dv, df, dw, dh0
