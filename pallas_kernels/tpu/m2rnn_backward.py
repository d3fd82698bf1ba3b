"""Backward TPU kernel: all input gradients from the chunk-boundary checkpoints of the forward.

Grid (R, G, NC) like the forward, but the index maps walk the chunks in reverse (grid step c reads chunk NC-1-c).
Per chunk: upcast the input blocks, recompute the chunk forward from its checkpoint (states before each step and the
tanh outputs go to VMEM scratch: O(C) states, never O(S)), then walk the steps backward carrying the state cotangent
R in registers and across chunks in scratch:

    G    = q_t dy_t^T + clamp(R_t)            (clamp only with gradient_clipping; SPEC §0.1)
    dq_t = S_t dy_t        df_t = <G, S_{t-1} - Z_t>        dA = G (1 - f_t) (1 - Z_t^2)
    dk_t = dA v_t          dv_t = dA^T k_t                  dW += S_{t-1}^T dA
    R_{t-1} = f_t G + dA W^T

No atomics: dq and dk are written per (head block, source slot), dv and df per output head (df per lane), dW is
accumulated per (row, head block) in scratch and written once; the sums over blocks, rows, lanes and broadcast
heads happen in XLA after the kernel. dh0 is R after the first step
(unclamped), written by DMA. Varlen: at the last token of sequence b, R is replaced by dh_final[b]; after its first
token, R is written to dh0[b]. Empty sequences are left to the caller (their dh0 is dh_final).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.heads import reduce_heads
from pallas_kernels.tpu import m2rnn_recurrence as recurrence
from pallas_kernels.tpu.m2rnn_common import (
    as_rows,
    compiler_params,
    hbm_spec,
    interpret_mode,
    pack_inputs,
    smem_scalar_grid,
    vmem_bytes,
)
from pallas_kernels.tpu.m2rnn_layout import (
    BlockPlan,
    pack_lanes,
    pack_state,
    unpack_gate_grad,
    unpack_lanes,
    unpack_source_grad,
    unpack_state,
    unpack_weight_grad,
)

_F32 = jnp.float32


def _step_gradients(
    t: jax.Array,
    cotangent: jax.Array,
    inputs: tuple,
    outputs: tuple,
    w: jax.Array,
    q_src: jax.Array,
    k_src: jax.Array,
    *,
    bf16_state: bool,
    clip: float | None,
) -> jax.Array:
    """The gradients of step t of the chunk, given the state cotangent R arriving from step t + 1 (SPEC §4.1):

        R <- clamp(R);  G = q_t dy_t^T + R;  dq_t = H_t dy_t;  df_t = sum(G * (H_{t-1} - Z_t));
        dA = (1 - f_t) G * (1 - Z_t^2);  dk_t = dA v_t;  dv_t = dA^T k_t;  dW += H_{t-1}^T dA;  R <- f_t G + dA W^T

    ``inputs``: the chunk's q, k, v, f, dy, states before each step and tanh outputs; ``outputs``: dq, dk, dv, df
    (written at step t) and the dW accumulator. Returns the cotangent for step t - 1 (Kp, L).
    """
    q_s, k_s, v_s, f_ref, dy_s, prev_s, z_s = inputs
    dq_ref, dk_ref, dv_ref, df_ref, dw_s = outputs
    prev, z, f_t = prev_s[t], z_s[t], f_ref[0, 0, pl.ds(t, 1), :]
    dy_t, v_t, q_t, k_t = dy_s[pl.ds(t, 1), :], v_s[pl.ds(t, 1), :], q_s[t], k_s[t]
    state = f_t * prev + (1.0 - f_t) * z
    if bf16_state:
        state = state.astype(jnp.bfloat16).astype(_F32)
    if clip is not None:
        cotangent = jnp.clip(cotangent, -clip, clip)
    g = recurrence.outer(q_t, dy_t, q_src) + cotangent
    dq_ref[0, 0, t] = recurrence.contract_lanes(state * dy_t, q_src)
    df_ref[0, 0, pl.ds(t, 1), :] = jnp.sum(g * (prev - z), axis=0, keepdims=True)
    da = g * (1.0 - f_t) * (1.0 - z * z)
    dk_ref[0, 0, t] = recurrence.contract_lanes(da * v_t, k_src)
    dv_ref[0, 0, pl.ds(t, 1), :] = recurrence.contract_rows(k_t, da, k_src)
    dw_s[...] += recurrence.matmul_tn(prev, da)
    return f_t * g + recurrence.matmul_nt(da, w)


def _backward_kernel(*refs, plan: BlockPlan, num_seqs: int, varlen: bool, bf16_state: bool, clip: float | None):
    if varlen:
        cu_ref, *refs = refs
        q_ref, k_ref, q_src_ref, k_src_ref, v_ref, f_ref, w_ref, ckpt_ref, dy_ref, dfinal_hbm, h0_hbm, *refs = refs
    else:
        q_ref, k_ref, q_src_ref, k_src_ref, v_ref, f_ref, w_ref, ckpt_ref, dy_ref, dfinal_hbm, *refs = refs
    dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_hbm, *refs = refs
    q_s, k_s, v_s, dy_s, prev_s, z_s, carry_s, dw_s, io_s, seq_s = refs
    row, block, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    chunk = plan.num_chunks - 1 - step
    size = plan.chunk

    @pl.when(step == 0)
    def _init():
        dw_s[...] = jnp.zeros(dw_s.shape, _F32)
        if varlen:  # the last real token ends a sequence and loads its dh_final
            carry_s[...] = jnp.zeros(carry_s.shape, _F32)
        else:
            pltpu.sync_copy(dfinal_hbm.at[row, block], carry_s)

    q_s[...] = q_ref[0, 0].astype(_F32)
    k_s[...] = k_ref[0, 0].astype(_F32)
    v_s[...] = v_ref[0, 0].astype(_F32)
    dy_s[...] = dy_ref[0, 0].astype(_F32)
    w, q_src, k_src = w_ref[0], q_src_ref[0], k_src_ref[0]

    def f_at(t):
        return f_ref[0, 0, pl.ds(t, 1), :]

    def token_flags(t, seq):
        return recurrence.token_flags(chunk * size + t, cu_ref, seq, plan.tokens)

    # Recompute the chunk forward from its checkpoint.
    def recompute(t, carry):
        state, seq = carry
        if varlen:
            seq = recurrence.sequence_at(chunk * size + t, cu_ref, num_seqs, seq)
            seq_s[t] = seq
            is_start, _ = token_flags(t, seq)

            def load_h0(_):
                pltpu.sync_copy(h0_hbm.at[seq, block], io_s)
                return io_s[...]

            state = lax.cond(is_start, load_h0, lambda s: s, state)
        prev_s[t] = state
        z, state = recurrence.step(state, w, k_s[t], v_s[pl.ds(t, 1), :], f_at(t), k_src, bf16_state)
        z_s[t] = z
        return state, seq

    lax.fori_loop(0, size, recompute, (ckpt_ref[0, 0, 0], jnp.int32(0)))

    def reverse(i, cotangent):
        t = size - 1 - i
        if varlen:
            seq = seq_s[t]
            is_start, is_end = token_flags(t, seq)

            def load_dfinal(_):
                pltpu.sync_copy(dfinal_hbm.at[seq, block], io_s)
                return io_s[...]

            cotangent = lax.cond(is_end, load_dfinal, lambda r: r, cotangent)
        inputs = (q_s, k_s, v_s, f_ref, dy_s, prev_s, z_s)
        outputs = (dq_ref, dk_ref, dv_ref, df_ref, dw_s)
        cotangent = _step_gradients(t, cotangent, inputs, outputs, w, q_src, k_src, bf16_state=bf16_state, clip=clip)
        if varlen:

            @pl.when(is_start)
            def _store_dh0():
                io_s[...] = cotangent
                pltpu.sync_copy(io_s, dh0_hbm.at[seq, block])

        return cotangent

    carry_s[...] = lax.fori_loop(0, size, reverse, carry_s[...])

    @pl.when(step == plan.num_chunks - 1)
    def _finish():
        dw_ref[0, 0] = dw_s[...]
        if not varlen:
            pltpu.sync_copy(carry_s, dh0_hbm.at[row, block])


def backward_buffers(plan: BlockPlan, q_slots: int, k_slots: int, in_dtype):
    """The kernel's VMEM buffers as (shape, dtype) lists: (pipelined blocks, double-buffered; VMEM scratch, single).

    Blocks: q, k, q_src, k_src, v, f, W, checkpoint (Kp, L), dy; results dq (C, mq, Kp), dk (C, mk, Kp), dv, df
    (C, L), dW (L, L), all f32 but the inputs. Scratch (f32): q, k, v, dy of the chunk, the states before each step
    and the tanh outputs (C, Kp, L) each, the carried cotangent, the dW accumulator, a DMA buffer.
    """
    c, kp, lanes = plan.chunk, plan.k_pad, plan.lanes
    pipelined = [((c, q_slots, kp), in_dtype), ((c, k_slots, kp), in_dtype), ((q_slots, lanes), _F32)]
    pipelined += [((k_slots, lanes), _F32), ((c, lanes), in_dtype), ((c, lanes), _F32), ((lanes, lanes), _F32)]
    pipelined += [((kp, lanes), _F32), ((c, lanes), in_dtype)]
    pipelined += [((c, q_slots, kp), _F32), ((c, k_slots, kp), _F32), ((c, lanes), _F32), ((c, lanes), _F32)]
    pipelined += [((lanes, lanes), _F32)]
    scratch = [((c, q_slots, kp), _F32), ((c, k_slots, kp), _F32)]
    scratch += [((c, lanes), _F32)] * 2 + [((c, kp, lanes), _F32)] * 2
    scratch += [((kp, lanes), _F32), ((lanes, lanes), _F32), ((kp, lanes), _F32)]
    return pipelined, scratch


def backward_call(
    plan: BlockPlan,
    num_seqs: int,
    q_slots: int,
    k_slots: int,
    in_dtype,
    *,
    varlen: bool,
    bf16_state: bool,
    clip: float | None,
    interpret=False,
):
    """Build the backward ``pallas_call`` on packed operands.

    Operands: [cu_seqlens (B+1,) int32 when varlen], q (R, G, Sp, mq, Kp), k (R, G, Sp, mk, Kp), q_src (G, mq, L),
    k_src (G, mk, L), v (R, G, Sp, L) in ``in_dtype``; f (R, G, Sp, L) float32; w (G, L, L) float32; checkpoints
    (R, G, NC, Kp, L) float32; dy (R, G, Sp, L) in ``in_dtype``; dh_final (B, G, Kp, L) float32; [h0 (B, G, Kp, L)
    float32 when varlen]. mq = ``q_slots``, mk = ``k_slots``.
    Results (float32 partials): dq (R, G, Sp, mq, Kp), dk (R, G, Sp, mk, Kp) per block and slot; dv (R, G, Sp, L)
    and df (R, G, Sp, L) per lane; dw (R, G, L, L) block diagonal; dh0 (B, G, Kp, L).
    """
    c, kp, lanes, g = plan.chunk, plan.k_pad, plan.lanes, plan.head_blocks
    last = plan.num_chunks - 1

    def chunk_of(t):
        return last - t

    q_spec = pl.BlockSpec((1, 1, c, q_slots, kp), lambda r, b, t, *_: (r, b, chunk_of(t), 0, 0))
    k_spec = pl.BlockSpec((1, 1, c, k_slots, kp), lambda r, b, t, *_: (r, b, chunk_of(t), 0, 0))
    lanes_spec = pl.BlockSpec((1, 1, c, lanes), lambda r, b, t, *_: (r, b, chunk_of(t), 0))
    in_specs = [
        q_spec,
        k_spec,
        pl.BlockSpec((1, q_slots, lanes), lambda r, b, t, *_: (b, 0, 0)),
        pl.BlockSpec((1, k_slots, lanes), lambda r, b, t, *_: (b, 0, 0)),
        lanes_spec,
        lanes_spec,
        pl.BlockSpec((1, lanes, lanes), lambda r, b, t, *_: (b, 0, 0)),
        pl.BlockSpec((1, 1, 1, kp, lanes), lambda r, b, t, *_: (r, b, chunk_of(t), 0, 0)),
        lanes_spec,
        hbm_spec(),
    ] + ([hbm_spec()] if varlen else [])
    out_specs = [
        q_spec,
        k_spec,
        lanes_spec,
        lanes_spec,
        pl.BlockSpec((1, 1, lanes, lanes), lambda r, b, t, *_: (r, b, 0, 0)),
        hbm_spec(),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((plan.rows, g, plan.tokens_pad, q_slots, kp), _F32),
        jax.ShapeDtypeStruct((plan.rows, g, plan.tokens_pad, k_slots, kp), _F32),
        jax.ShapeDtypeStruct((plan.rows, g, plan.tokens_pad, lanes), _F32),
        jax.ShapeDtypeStruct((plan.rows, g, plan.tokens_pad, lanes), _F32),
        jax.ShapeDtypeStruct((plan.rows, g, lanes, lanes), _F32),
        jax.ShapeDtypeStruct((num_seqs, g, kp, lanes), _F32),
    ]
    pipelined, scratch_shapes = backward_buffers(plan, q_slots, k_slots, in_dtype)
    scratch = [pltpu.VMEM(s, d) for s, d in scratch_shapes] + [pltpu.SMEM((c,), jnp.int32)]
    kernel = functools.partial(
        _backward_kernel, plan=plan, num_seqs=num_seqs, varlen=varlen, bf16_state=bf16_state, clip=clip
    )
    return pl.pallas_call(
        kernel,
        grid_spec=smem_scalar_grid(int(varlen), (plan.rows, g, plan.num_chunks), in_specs, out_specs, scratch),
        out_shape=out_shape,
        compiler_params=compiler_params(vmem_bytes(pipelined, scratch_shapes)),
        interpret=interpret_mode(interpret),
        name="m2rnn_tpu_backward",
    )


def m2rnn_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    checkpoints: jax.Array,
    dy: jax.Array,
    dh_final: jax.Array,
    *,
    cu_seqlens: jax.Array | None = None,
    num_heads: int,
    chunk_size: int | None = None,
    gradient_clipping: float | None = None,
    bf16_state: bool = False,
    interpret=False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients of M2RNN for the inputs of ``m2rnn_forward`` (same shapes, head counts and ``num_heads``).

    ``checkpoints`` come from ``m2rnn_forward(..., save_checkpoints=True)`` with the same ``chunk_size``;
    dy has y's shape (.., N, V), dh_final (B, N, K, V). ``gradient_clipping`` is None or |c|.
    Returns float32 gradients with the inputs' shapes: dq, dk, dv, df, dw and dh0 (B, N, K, V).
    """
    varlen = cu_seqlens is not None
    plan, packed = pack_inputs(q, k, v, w, f, h0, cu_seqlens, chunk_size, num_heads)
    num_seqs = packed.h0.shape[0]
    q_slots, k_slots = packed.q_slots, packed.k_slots
    call = backward_call(
        plan,
        num_seqs,
        q_slots.shape[1],
        k_slots.shape[1],
        v.dtype,
        varlen=varlen,
        bf16_state=bf16_state,
        clip=gradient_clipping,
        interpret=interpret,
    )
    dfinal = pack_state(dh_final.astype(_F32), plan)
    operands = (
        packed.q,
        packed.k,
        packed.q_src,
        packed.k_src,
        packed.v,
        packed.f,
        packed.w,
        checkpoints,
        pack_lanes(as_rows(dy.astype(v.dtype), varlen), plan),
        dfinal,
    )
    if varlen:
        results = call(packed.cu_seqlens, *operands, packed.h0)
    else:
        results = call(*operands)
    dq, dk, dv, df, dw, dh0 = results
    head_axis = 2  # of the (R, S, N, ..) arrays
    dq = unpack_source_grad(dq, plan, q_slots, q.shape[-2])
    dk = unpack_source_grad(dk, plan, k_slots, k.shape[-2])
    dv = reduce_heads(unpack_lanes(dv, plan), v.shape[-2], head_axis)
    df = reduce_heads(unpack_gate_grad(df, plan), f.shape[-1], head_axis)
    dw = reduce_heads(unpack_weight_grad(dw.sum(axis=0), plan), w.shape[0], 0)
    dh0 = unpack_state(dh0, plan)
    if varlen:
        dq, dk, dv, df = dq[0], dk[0], dv[0], df[0]
        empty = (cu_seqlens[1:] == cu_seqlens[:-1])[:, None, None, None]
        dh0 = jnp.where(empty, dh_final.astype(_F32), dh0)
    return dq, dk, dv, df, dw, dh0
