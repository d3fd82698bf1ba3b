"""Forward TPU kernel: y, the final states and (optionally) the chunk-boundary states for the backward.

Grid (R, G, NC) = (rows, head blocks, time chunks); the chunk axis is last and "arbitrary" and the float32 state
lives in VMEM scratch across chunks. Per chunk: the input blocks are upcast once into float32 scratch (per-step
indexing of bf16 blocks does not compile on Mosaic), the state at the chunk start is written out as a checkpoint,
then a ``fori_loop`` walks the C steps with the state in registers, collecting y rows in float32 scratch that is
cast and stored once per chunk.

Dense inputs: grid row r is sequence r; its h0 is read (DMA) at the first chunk and its final state written at the
last (time padding holds f = 1, so the state at the end of the padded axis is the state after step S - 1).
Varlen inputs: one grid row holds all packed tokens; ``cu_seqlens`` is prefetched into SMEM, and at the first token
of sequence b the state is replaced by h0[b] (DMA from HBM) and at its last token written to slot b of the final
states (DMA to HBM), so any number of sequences fits without VMEM growing with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu import m2rnn_recurrence as recurrence
from pallas_kernels.tpu.m2rnn_common import (
    compiler_params,
    hbm_spec,
    interpret_mode,
    pack_inputs,
    smem_scalar_grid,
    vmem_bytes,
)
from pallas_kernels.tpu.m2rnn_layout import BlockPlan, unpack_lanes, unpack_state

_F32 = jnp.float32


def _forward_kernel(*refs, plan: BlockPlan, num_seqs: int, varlen: bool, bf16_state: bool, save_checkpoints: bool):
    if varlen:
        cu_ref, *refs = refs
    q_ref, k_ref, q_src_ref, k_src_ref, v_ref, f_ref, w_ref, h0_hbm, y_ref, final_hbm, *refs = refs
    ckpt_ref = refs.pop(0) if save_checkpoints else None
    q_s, k_s, v_s, y_s, state_s, io_s = refs
    row, block, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    size = plan.chunk

    @pl.when(chunk == 0)
    def _init():
        if varlen:  # the first token starts a sequence and loads its h0
            state_s[...] = jnp.zeros(state_s.shape, _F32)
        else:
            pltpu.sync_copy(h0_hbm.at[row, block], state_s)

    q_s[...] = q_ref[0, 0].astype(_F32)
    k_s[...] = k_ref[0, 0].astype(_F32)
    v_s[...] = v_ref[0, 0].astype(_F32)
    if save_checkpoints:
        ckpt_ref[0, 0, 0] = state_s[...]
    w, q_src, k_src = w_ref[0], q_src_ref[0], k_src_ref[0]

    def advance(t, state):
        f_t, v_t = f_ref[0, 0, pl.ds(t, 1), :], v_s[pl.ds(t, 1), :]
        _, state = recurrence.step(state, w, k_s[t], v_t, f_t, k_src, bf16_state)
        y_s[pl.ds(t, 1), :] = recurrence.contract_rows(q_s[t], state, q_src)
        return state

    if varlen:

        def body(t, carry):
            state, seq = carry
            token = chunk * size + t
            seq = recurrence.sequence_at(token, cu_ref, num_seqs, seq)
            is_start, is_end = recurrence.token_flags(token, cu_ref, seq, plan.tokens)

            def load_h0(_):
                pltpu.sync_copy(h0_hbm.at[seq, block], io_s)
                return io_s[...]

            state = lax.cond(is_start, load_h0, lambda s: s, state)
            state = advance(t, state)

            @pl.when(is_end)
            def _store_final():
                io_s[...] = state
                pltpu.sync_copy(io_s, final_hbm.at[seq, block])

            return state, seq

        first_seq = recurrence.sequence_at(chunk * size, cu_ref, num_seqs, jnp.int32(0))
        state, _ = lax.fori_loop(0, size, body, (state_s[...], first_seq))
    else:
        state = lax.fori_loop(0, size, advance, state_s[...])
    state_s[...] = state
    y_ref[0, 0] = y_s[...].astype(y_ref.dtype)

    if not varlen:

        @pl.when(chunk == plan.num_chunks - 1)
        def _final():
            pltpu.sync_copy(state_s, final_hbm.at[row, block])


def forward_buffers(plan: BlockPlan, q_slots: int, k_slots: int, in_dtype, save_checkpoints: bool):
    """The kernel's VMEM buffers as (shape, dtype) lists: (pipelined blocks, double-buffered; scratch, single).

    Blocks: q (C, mq, Kp), k (C, mk, Kp), q_src (mq, L), k_src (mk, L), v (C, L), f (C, L) f32, W (L, L) f32,
    y (C, L) [, checkpoint (Kp, L) f32]. Scratch (f32): q, k, v, y of the chunk, the carried state, a DMA buffer.
    """
    c, kp, lanes = plan.chunk, plan.k_pad, plan.lanes
    pipelined = [((c, q_slots, kp), in_dtype), ((c, k_slots, kp), in_dtype), ((q_slots, lanes), _F32)]
    pipelined += [((k_slots, lanes), _F32), ((c, lanes), in_dtype), ((c, lanes), _F32), ((lanes, lanes), _F32)]
    pipelined += [((c, lanes), in_dtype)] + ([((kp, lanes), _F32)] if save_checkpoints else [])
    scratch = [((c, q_slots, kp), _F32), ((c, k_slots, kp), _F32)]
    scratch += [((c, lanes), _F32)] * 2 + [((kp, lanes), _F32)] * 2
    return pipelined, scratch


def forward_call(
    plan: BlockPlan,
    num_seqs: int,
    q_slots: int,
    k_slots: int,
    out_dtype,
    *,
    varlen: bool,
    bf16_state: bool,
    save_checkpoints: bool,
    interpret=False,
):
    """Build the forward ``pallas_call`` on packed operands (:class:`~pallas_kernels.tpu.m2rnn_common.PackedInputs`).

    Operands: [cu_seqlens (B+1,) int32 when varlen], q (R, G, Sp, mq, Kp), k (R, G, Sp, mk, Kp), q_src (G, mq, L),
    k_src (G, mk, L), v (R, G, Sp, L), f (R, G, Sp, L) float32, w (G, L, L) float32, h0 (B, G, Kp, L) float32;
    mq = ``q_slots``, mk = ``k_slots``.
    Results: y (R, G, Sp, L) in ``out_dtype``, final states (B, G, Kp, L) float32 and, with ``save_checkpoints``,
    the state at the start of every chunk (R, G, NC, Kp, L) float32.
    """
    c, kp, lanes, g = plan.chunk, plan.k_pad, plan.lanes, plan.head_blocks
    rows_blocks = (plan.rows, g, plan.num_chunks)
    pipelined, scratch = forward_buffers(plan, q_slots, k_slots, out_dtype, save_checkpoints)
    in_specs = [
        pl.BlockSpec((1, 1, c, q_slots, kp), lambda r, b, t, *_: (r, b, t, 0, 0)),
        pl.BlockSpec((1, 1, c, k_slots, kp), lambda r, b, t, *_: (r, b, t, 0, 0)),
        pl.BlockSpec((1, q_slots, lanes), lambda r, b, t, *_: (b, 0, 0)),
        pl.BlockSpec((1, k_slots, lanes), lambda r, b, t, *_: (b, 0, 0)),
        pl.BlockSpec((1, 1, c, lanes), lambda r, b, t, *_: (r, b, t, 0)),
        pl.BlockSpec((1, 1, c, lanes), lambda r, b, t, *_: (r, b, t, 0)),
        pl.BlockSpec((1, lanes, lanes), lambda r, b, t, *_: (b, 0, 0)),
        hbm_spec(),
    ]
    out_specs = [pl.BlockSpec((1, 1, c, lanes), lambda r, b, t, *_: (r, b, t, 0)), hbm_spec()]
    out_shape = [
        jax.ShapeDtypeStruct((plan.rows, g, plan.tokens_pad, lanes), out_dtype),
        jax.ShapeDtypeStruct((num_seqs, g, kp, lanes), _F32),
    ]
    if save_checkpoints:
        out_specs.append(pl.BlockSpec((1, 1, 1, kp, lanes), lambda r, b, t, *_: (r, b, t, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((plan.rows, g, plan.num_chunks, kp, lanes), _F32))
    kernel = functools.partial(
        _forward_kernel,
        plan=plan,
        num_seqs=num_seqs,
        varlen=varlen,
        bf16_state=bf16_state,
        save_checkpoints=save_checkpoints,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=smem_scalar_grid(
            int(varlen), rows_blocks, in_specs, out_specs, [pltpu.VMEM(s, d) for s, d in scratch]
        ),
        out_shape=out_shape,
        compiler_params=compiler_params(vmem_bytes(pipelined, scratch)),
        interpret=interpret_mode(interpret),
        name="m2rnn_tpu_forward",
    )


def m2rnn_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    h0: jax.Array | None = None,
    *,
    cu_seqlens: jax.Array | None = None,
    num_heads: int,
    chunk_size: int | None = None,
    bf16_state: bool = False,
    save_checkpoints: bool = False,
    interpret=False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """M2RNN forward (the op's semantics, SPEC §2) with any head broadcasting.

    Dense: q (B, S, Nq, K), k (B, S, Nk, K), v (B, S, Nv, V), f (B, S, Nf), w (Nw, V, V), h0 (B, N, K, V) or None
    (zeros); each head count divides ``num_heads`` N = max(Nq, Nk, Nv, Nf, Nw). Varlen (``cu_seqlens`` (B+1,)
    given): q (T, Nq, K), k (T, Nk, K), v (T, Nv, V), f (T, Nf).
    Returns y (.., N, V) in v's dtype, the final states (B, N, K, V) float32 and, with ``save_checkpoints``, the
    packed chunk-start states (R, G, NC, Kp, L) float32 (else None). An empty varlen sequence returns its h0.
    ``interpret``: False (compile for TPU), True (TPU interpret mode) or a ``pltpu.InterpretParams``.
    """
    varlen = cu_seqlens is not None
    plan, packed = pack_inputs(q, k, v, w, f, h0, cu_seqlens, chunk_size, num_heads)
    num_seqs = packed.h0.shape[0]
    call = forward_call(
        plan,
        num_seqs,
        packed.q_slots.shape[1],
        packed.k_slots.shape[1],
        v.dtype,
        varlen=varlen,
        bf16_state=bf16_state,
        save_checkpoints=save_checkpoints,
        interpret=interpret,
    )
    operands = (packed.q, packed.k, packed.q_src, packed.k_src, packed.v, packed.f, packed.w, packed.h0)
    results = call(packed.cu_seqlens, *operands) if varlen else call(*operands)
    y_packed, final_packed = results[0], results[1]
    checkpoints = results[2] if save_checkpoints else None
    y = unpack_lanes(y_packed, plan)
    final = unpack_state(final_packed, plan)
    if varlen:
        y = y[0]
        empty = (cu_seqlens[1:] == cu_seqlens[:-1])[:, None, None, None]
        final = jnp.where(empty, unpack_state(packed.h0, plan), final)
    return y, final, checkpoints
