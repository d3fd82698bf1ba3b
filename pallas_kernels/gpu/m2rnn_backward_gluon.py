"""Fused M2RNN backward kernel with explicit register layouts (Gluon, Triton 3.6), for dense bf16/f16 inputs.

The counterpart of ``m2rnn_forward_gluon``: one warp per (output head n, sequence b, block of ``rows`` state rows),
the state rows being independent (SPEC §2.2). It reads the forward's float32 checkpoints (every C steps) and
sweeps the chunks in reverse. For each chunk:

1. walk the chunk forward from its checkpoint, storing the state at the start of every block of ``block`` steps
   (B_r = ``block``) to a small global scratch (written and read by the same thread: no barrier);
2. block by block in reverse (each block's start state loaded one block ahead): recompute the block's H_{t-1}
   (rounded to the input dtype), Z_t (float32) and dq_t = H_t dy_t into shared memory, then walk its steps
   backward with the math and clipping placement of SPEC §4.1 / §0.1:

    G = q_t dy_t^T + clamp(R)            df_t = sum(G * (H_{t-1} - Z_t))
    dP = (1 - f_t) G * (1 - Z_t^2)       dv_t = dP^T k_t      dk_t = dP v_t
    R  <- f_t G + dP W^T                 (after the first step of the sequence: dh0 = R, unclamped)

   and after the block dW += sum_t H_{t-1}^T dP_t (both operands in the input dtype, as the Pallas-Triton
   backward rounds them).

R, G and dP live in the mma accumulator layout; R's update is one mma with dP (rounded to the input dtype) as
the A operand (the accumulator -> operand register shortcut) and W^T in registers as the B operand, f_t G as the
accumulator input. H_{t-1} and dP_t of a block go through shared memory, so that dW's operands are transposed by
``ldmatrix`` on the way out. The per-step gradients (dq, dk, dv, df) are staged in shared memory too and written to
global memory once per block with wide stores (no per-step stores of replicated values, which ptxas turns into
branches). The state-shaped buffers are XOR-swizzled: without it every access to them was a 2-way bank conflict,
and shared-memory wavefronts were the limit of this kernel (ncu: L1 data pipe 77% busy, H200 run 24).

Per step that is three evaluations of the recurrence (chunk walk, block recompute; the reverse step reuses Z_t)
and no per-step state traffic through global memory. Outputs follow ``m2rnn_backward`` (Pallas-Triton): dq, dk
per output head, dv, df per row block, dW per (sequence, head, row block), dh0; the caller sums the partials.
Memory beyond them: the block starts, B N K V (C / B_r) floats. Shared memory per program: B_r rows V (4 + 2 + 2)
bytes for the state buffers, plus the staged inputs and gradients of a block (18 KB at rows 32, V 16, B_r 4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.m2rnn_gluon_common import (
    CompiledKernel,
    compile_gluon,
    compute_capability,
    helpers,
    launch,
    staging_vector,
    tanh_constexprs,
    triton_dtype,
)

# ptxas cap per thread: uncapped, ptxas has taken up to 218 registers (9 one-warp programs per SM on the H200, 10.2
# needed at B=8 S=4096 N=84); 168 allows 12 per SM without spills (sm_90, 32 rows; the 18.4 KB of shared memory
# allow 11). 176 was slower (H200 run 28).
MAX_REGISTERS = 168


@dataclasses.dataclass(frozen=True)
class GluonBackwardSpec:
    """Static description of one compiled backward kernel (hashable: it keys the compile cache).

    As ``GluonForwardSpec`` (S, N, K, V, head groups, C, dtypes, batch, rows, tanh), plus block: steps recomputed
    at a time into shared memory (divides C), and clip: the state-cotangent clamp (None = none).
    """

    seq_len: int
    num_heads: int
    k_dim: int
    v_dim: int
    group_q: int
    group_k: int
    group_v: int
    group_f: int
    group_w: int
    chunk_size: int
    dtype: str
    f_dtype: str
    batch: int
    rows: int
    block: int
    clip: float | None
    tanh: str = "mixed"


def _kernel():
    """Build the Gluon kernel (imports Triton; called once)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    common = helpers()
    load_block = common.load_block
    stage_block = common.stage_block
    staged_step = common.staged_step
    step_view = common.step_view
    recurrence_step = common.recurrence_step

    @gluon.jit
    def load_block_with_dy(
        q_ptr,
        k_ptr,
        v_ptr,
        f_ptr,
        dy_ptr,
        first_tok,
        t0,
        S: gl.constexpr,
        n,
        kb,
        N: gl.constexpr,
        NQ: gl.constexpr,
        NK: gl.constexpr,
        NV: gl.constexpr,
        NF: gl.constexpr,
        GQ: gl.constexpr,
        GK: gl.constexpr,
        GV: gl.constexpr,
        GF: gl.constexpr,
        K: gl.constexpr,
        V: gl.constexpr,
        ROWS: gl.constexpr,
        RB: gl.constexpr,
        ROW_STAGE: gl.constexpr,
        COL_STAGE: gl.constexpr,
    ):
        """``load_block`` of steps t0 .. t0 + RB - 1 plus dy (RB, V) of head n (t0 < 0 after the first chunk:
        everything masked)."""
        q, k, v, f = load_block(
            q_ptr,
            k_ptr,
            v_ptr,
            f_ptr,
            first_tok,
            t0,
            S,
            n,
            kb,
            NQ,
            NK,
            NV,
            NF,
            GQ,
            GK,
            GV,
            GF,
            K,
            V,
            ROWS,
            RB,
            ROW_STAGE,
            COL_STAGE,
        )
        steps = t0 + gl.arange(0, RB, layout=gl.SliceLayout(1, COL_STAGE))
        cols = gl.arange(0, V, layout=gl.SliceLayout(0, COL_STAGE))
        tok = (first_tok + steps)[:, None]
        dy = gl.load(
            dy_ptr + (tok * N + n) * V + cols[None, :],
            mask=((steps >= 0) & (steps < S))[:, None] & (cols < V)[None, :],
            other=0.0,
        )
        return q, k, v, f, dy

    @gluon.jit
    def restage(
        q_s,
        k_s,
        v_s,
        f_s,
        dy_s,
        q_b,
        k_b,
        v_b,
        f_b,
        dy_b,
        q_ptr,
        k_ptr,
        v_ptr,
        f_ptr,
        dy_ptr,
        first_tok,
        t0,
        S: gl.constexpr,
        n,
        kb,
        N: gl.constexpr,
        NQ: gl.constexpr,
        NK: gl.constexpr,
        NV: gl.constexpr,
        NF: gl.constexpr,
        GQ: gl.constexpr,
        GK: gl.constexpr,
        GV: gl.constexpr,
        GF: gl.constexpr,
        K: gl.constexpr,
        V: gl.constexpr,
        ROWS: gl.constexpr,
        RB: gl.constexpr,
        ROW_STAGE: gl.constexpr,
        COL_STAGE: gl.constexpr,
    ):
        """Store the staged block (``q_b`` ... ``dy_b``) into the one stage (after the previous block's reads are
        done) and load the block of steps t0 .. t0 + RB - 1 in its place."""
        gl.thread_barrier()
        dy_s.store(dy_b.to(gl.float32))
        stage_block(q_s, k_s, v_s, f_s, q_b.to(gl.float32), k_b.to(gl.float32), v_b.to(gl.float32), f_b.to(gl.float32))
        return load_block_with_dy(
            q_ptr,
            k_ptr,
            v_ptr,
            f_ptr,
            dy_ptr,
            first_tok,
            t0,
            S,
            n,
            kb,
            N,
            NQ,
            NK,
            NV,
            NF,
            GQ,
            GK,
            GV,
            GF,
            K,
            V,
            ROWS,
            RB,
            ROW_STAGE,
            COL_STAGE,
        )

    @gluon.jit
    def store_block_gradients(
        dq_s,
        dk_s,
        dv_s,
        df_s,
        dq_ptr,
        dk_ptr,
        dv_ptr,
        df_ptr,
        first_tok,
        t0,
        S: gl.constexpr,
        TOKENS: gl.constexpr,
        n,
        kb,
        N: gl.constexpr,
        K: gl.constexpr,
        V: gl.constexpr,
        ROWS: gl.constexpr,
        RB: gl.constexpr,
        ROW_STAGE: gl.constexpr,
        COL_STAGE: gl.constexpr,
    ):
        """Write the per-step gradients of the block of steps t0 .. t0 + RB - 1, staged in shared memory by its
        recompute and reverse walk (dq, dk (RB, ROWS), dv (RB, V), df (RB, 1)), to global memory with wide stores,
        steps past the end of the sequence masked."""
        gl.thread_barrier()
        steps_r = t0 + gl.arange(0, RB, layout=gl.SliceLayout(1, ROW_STAGE))
        rows = kb * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, ROW_STAGE))
        offsets_r = ((first_tok + steps_r)[:, None] * N + n).to(gl.int64) * K + rows[None, :]
        mask_r = (steps_r < S)[:, None] & (rows < K)[None, :]
        gl.store(dq_ptr + offsets_r, dq_s.load(ROW_STAGE), mask=mask_r)
        gl.store(dk_ptr + offsets_r, dk_s.load(ROW_STAGE), mask=mask_r)
        steps_c = t0 + gl.arange(0, RB, layout=gl.SliceLayout(1, COL_STAGE))
        cols = gl.arange(0, V, layout=gl.SliceLayout(0, COL_STAGE))
        partial = (kb * TOKENS + first_tok + steps_c).to(gl.int64) * N + n
        gl.store(
            dv_ptr + partial[:, None] * V + cols[None, :],
            dv_s.load(COL_STAGE),
            mask=(steps_c < S)[:, None] & (cols < V)[None, :],
        )
        gl.store(df_ptr + partial, gl.sum(df_s.load(COL_STAGE), axis=1), mask=steps_c < S)

    @gluon.jit
    def m2rnn_backward_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        w_ptr,
        f_ptr,
        checkpoints_ptr,
        dy_ptr,
        dh_final_ptr,  # inputs
        dq_ptr,
        dk_ptr,
        dv_ptr,
        df_ptr,
        dw_ptr,
        dh0_ptr,
        starts_ptr,  # outputs (starts: scratch)
        S: gl.constexpr,
        TOKENS: gl.constexpr,
        N: gl.constexpr,
        K: gl.constexpr,
        V: gl.constexpr,
        GQ: gl.constexpr,
        GK: gl.constexpr,
        GV: gl.constexpr,
        GF: gl.constexpr,
        GW: gl.constexpr,
        C: gl.constexpr,
        ROWS: gl.constexpr,
        RB: gl.constexpr,
        USE_CLIP: gl.constexpr,
        CLIP: gl.constexpr,
        TANH_ASM: gl.constexpr,
        TANH_CONSTRAINTS: gl.constexpr,
        TANH_PACK: gl.constexpr,
        ROW_VEC: gl.constexpr,
        COL_VEC: gl.constexpr,
        F32_PHASE: gl.constexpr,
        LOW_PHASE: gl.constexpr,
    ):
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=acc_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
        # staging of a block's inputs: ROW_VEC / COL_VEC contiguous values per thread and load
        row_stage: gl.constexpr = gl.BlockedLayout(
            [1, ROW_VEC], [32 // (ROWS // ROW_VEC), ROWS // ROW_VEC], [1, 1], [1, 0]
        )
        col_stage: gl.constexpr = gl.BlockedLayout([1, COL_VEC], [32 // (V // COL_VEC), V // COL_VEC], [1, 1], [1, 0])
        smem_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        # (ROWS, V) state-shaped buffers: 8-element units of a row XOR-swizzled over groups of rows, so that the
        # accumulator-layout accesses and ldmatrix / stmatrix hit every bank once (no swizzle: 2-way conflicts)
        f32_state_smem: gl.constexpr = gl.SwizzledSharedLayout(
            vec=8, per_phase=F32_PHASE, max_phase=V // 8, order=[1, 0]
        )
        low_state_smem: gl.constexpr = gl.SwizzledSharedLayout(
            vec=8, per_phase=LOW_PHASE, max_phase=V // 8, order=[1, 0]
        )
        NQ: gl.constexpr = N // GQ
        NK: gl.constexpr = N // GK
        NV: gl.constexpr = N // GV
        NF: gl.constexpr = N // GF
        NUM_CHUNKS: gl.constexpr = (S + C - 1) // C
        KB: gl.constexpr = K // ROWS

        n = gl.program_id(0)
        b = gl.program_id(1)
        kb = gl.program_id(2)
        rows = kb * ROWS + gl.arange(0, ROWS, layout=row_layout)
        cols = gl.arange(0, V, layout=col_layout)
        local_offsets = (rows[:, None] - kb * ROWS) * V + cols[None, :]
        state_offsets = rows[:, None] * V + cols[None, :]  # (ROWS, V) in the accumulator layout

        w_rows = gl.arange(0, V, layout=gl.SliceLayout(1, b_layout))
        w_cols = gl.arange(0, V, layout=gl.SliceLayout(0, b_layout))
        w_base = w_ptr + (n // GW) * V * V
        w = gl.load(w_base + w_rows[:, None] * V + w_cols[None, :])
        w_t = gl.load(w_base + w_cols[None, :] * V + w_rows[:, None])  # W^T (V, V) in the B-operand layout

        head_state = (b * N + n).to(gl.int64) * K * V
        program = (b * N + n) * KB + kb
        starts = starts_ptr + program.to(gl.int64) * (C // RB) * ROWS * V + local_offsets
        # per step of a block: Z_t (float32) and H_{t-1} (input dtype: the operand of dW, and of df) from the
        # recompute, dP_t (input dtype) from the reverse walk
        z_s = gl.allocate_shared_memory(gl.float32, [RB, ROWS, V], f32_state_smem)
        hb_s = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [RB, ROWS, V], low_state_smem)
        dp_s = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [RB, ROWS, V], low_state_smem)
        # The inputs of each block of RB steps go through shared memory (q_s ...), loaded into registers one block
        # ahead in processing order: per chunk the walk's blocks 0 .. nb - 2, then blocks nb - 1 .. 0 backward,
        # then block 0 of the chunk before.
        q_s = gl.allocate_shared_memory(gl.float32, [RB, ROWS], smem_layout)
        k_s = gl.allocate_shared_memory(gl.float32, [RB, ROWS], smem_layout)
        v_s = gl.allocate_shared_memory(gl.float32, [RB, V], smem_layout)
        f_s = gl.allocate_shared_memory(gl.float32, [RB, V], smem_layout)
        dy_s = gl.allocate_shared_memory(gl.float32, [RB, V], smem_layout)
        # the per-step gradients of a block, written to global memory once per block
        dq_s = gl.allocate_shared_memory(dq_ptr.dtype.element_ty, [RB, ROWS], smem_layout)
        dk_s = gl.allocate_shared_memory(dk_ptr.dtype.element_ty, [RB, ROWS], smem_layout)
        dv_s = gl.allocate_shared_memory(dv_ptr.dtype.element_ty, [RB, V], smem_layout)
        df_s = gl.allocate_shared_memory(gl.float32, [RB, 1], smem_layout)

        r = gl.load(dh_final_ptr + head_state + state_offsets)
        dw = gl.zeros([V, V], gl.float32, acc_layout)
        first_tok = b * S
        q_b, k_b, v_b, f_b, dy_b = load_block_with_dy(
            q_ptr,
            k_ptr,
            v_ptr,
            f_ptr,
            dy_ptr,
            first_tok,
            (NUM_CHUNKS - 1) * C,
            S,
            n,
            kb,
            N,
            NQ,
            NK,
            NV,
            NF,
            GQ,
            GK,
            GV,
            GF,
            K,
            V,
            ROWS,
            RB,
            row_stage,
            col_stage,
        )
        for cc in range(NUM_CHUNKS):
            c = NUM_CHUNKS - 1 - cc
            chunk_start = c * C
            chunk_end = gl.minimum(chunk_start + C, S)
            num_blocks = (chunk_end - chunk_start + RB - 1) // RB
            slot = (b * NUM_CHUNKS + c).to(gl.int64) * N + n
            h = gl.load(checkpoints_ptr + slot * K * V + state_offsets)
            # 1. walk blocks 0 .. nb - 2 forward, storing each block's starting state (the RB steps unrolled)
            for j in range(num_blocks - 1):
                gl.store(starts + j * ROWS * V, h)
                q_b, k_b, v_b, f_b, dy_b = restage(
                    q_s,
                    k_s,
                    v_s,
                    f_s,
                    dy_s,
                    q_b,
                    k_b,
                    v_b,
                    f_b,
                    dy_b,
                    q_ptr,
                    k_ptr,
                    v_ptr,
                    f_ptr,
                    dy_ptr,
                    first_tok,
                    chunk_start + (j + 1) * RB,
                    S,
                    n,
                    kb,
                    N,
                    NQ,
                    NK,
                    NV,
                    NF,
                    GQ,
                    GK,
                    GV,
                    GF,
                    K,
                    V,
                    ROWS,
                    RB,
                    row_stage,
                    col_stage,
                )
                for s in gl.static_range(RB):
                    _, k, v, f = staged_step(q_s, k_s, v_s, f_s, s, row_layout, col_layout)
                    _, h = recurrence_step(h, w, k, v, f[None, :], a_layout, TANH_ASM, TANH_CONSTRAINTS, TANH_PACK)
            # 2. blocks nb - 1 .. 0 backward (the last block starts from the walk's state; each block's start is
            # loaded one block ahead, so that its latency is hidden)
            h_next = h
            for jj in range(num_blocks):
                j = num_blocks - 1 - jj
                h = h_next
                h_next = gl.load(starts + gl.maximum(j - 1, 0) * ROWS * V)
                block_start = chunk_start + j * RB
                next_start = gl.where(j > 0, block_start - RB, chunk_start - C)
                q_b, k_b, v_b, f_b, dy_b = restage(
                    q_s,
                    k_s,
                    v_s,
                    f_s,
                    dy_s,
                    q_b,
                    k_b,
                    v_b,
                    f_b,
                    dy_b,
                    q_ptr,
                    k_ptr,
                    v_ptr,
                    f_ptr,
                    dy_ptr,
                    first_tok,
                    next_start,
                    S,
                    n,
                    kb,
                    N,
                    NQ,
                    NK,
                    NV,
                    NF,
                    GQ,
                    GK,
                    GV,
                    GF,
                    K,
                    V,
                    ROWS,
                    RB,
                    row_stage,
                    col_stage,
                )
                # recompute the block into shared memory: H_{t-1}, Z_t, and dq_t = H_t dy_t from the float32 state.
                # Both loops run RB steps also in a ragged last block: steps past the end of the sequence have f = 1
                # and zero inputs (``load_block``), so the state cotangent passes through them clamped (which the next
                # step's clamp makes a no-op), and their gradients are not stored.
                for s in range(RB):
                    _, k, v, f = staged_step(q_s, k_s, v_s, f_s, s, row_layout, col_layout)
                    dy = step_view(dy_s).index(s).load(col_layout)
                    hb_s.index(s).store(h.to(w.dtype))
                    z, h = recurrence_step(h, w, k, v, f[None, :], a_layout, TANH_ASM, TANH_CONSTRAINTS, TANH_PACK)
                    z_s.index(s).store(z)
                    step_view(dq_s).index(s).store(gl.sum(h * dy[None, :], axis=1).to(dq_ptr.dtype.element_ty))
                # walk the block backward
                for ss in range(RB):
                    s = RB - 1 - ss
                    q, k, v, f = staged_step(q_s, k_s, v_s, f_s, s, row_layout, col_layout)
                    dy = step_view(dy_s).index(s).load(col_layout)
                    h_prev = hb_s.index(s).load(acc_layout).to(gl.float32)
                    z = z_s.index(s).load(acc_layout)
                    if USE_CLIP:
                        r = gl.minimum(gl.maximum(r, -CLIP), CLIP)
                    g = q[:, None] * dy[None, :] + r
                    step_view(df_s).index(s).store(gl.sum(gl.sum(g * (h_prev - z), axis=1)[:, None], axis=0))
                    dp = ((1 - f[None, :]) * g) * (1 - z * z)
                    step_view(dk_s).index(s).store(gl.sum(dp * v[None, :], axis=1).to(dk_ptr.dtype.element_ty))
                    step_view(dv_s).index(s).store(gl.sum(k[:, None] * dp, axis=0).to(dv_ptr.dtype.element_ty))
                    dp_low = dp.to(w.dtype)
                    dp_s.index(s).store(dp_low)
                    r = mma_v2(gl.convert_layout(dp_low, a_layout), w_t, f[None, :] * g)
                # dW += H_{t-1}^T dP_t over the block's steps (operands transposed on the way out of shared memory)
                gl.thread_barrier()
                for s in gl.static_range(RB):
                    dw = mma_v2(hb_s.index(s).permute([1, 0]).load(a_layout), dp_s.index(s).load(b_layout), dw)
                store_block_gradients(
                    dq_s,
                    dk_s,
                    dv_s,
                    df_s,
                    dq_ptr,
                    dk_ptr,
                    dv_ptr,
                    df_ptr,
                    first_tok,
                    block_start,
                    S,
                    TOKENS,
                    n,
                    kb,
                    N,
                    K,
                    V,
                    ROWS,
                    RB,
                    row_stage,
                    col_stage,
                )
        gl.store(dh0_ptr + head_state + state_offsets, r)
        dw_rows = gl.arange(0, V, layout=row_layout)
        gl.store(dw_ptr + program.to(gl.int64) * V * V + dw_rows[:, None] * V + cols[None, :], dw)

    return m2rnn_backward_kernel


@functools.cache
def gluon_kernel():
    return _kernel()


@functools.cache
def compile_backward(spec: GluonBackwardSpec, arch: int = 90) -> CompiledKernel:
    """Compile the kernel for ``spec`` to PTX (Triton 3.6; runs without a GPU)."""
    dt = spec.dtype
    pointers = {
        "q_ptr": f"*{dt}",
        "k_ptr": f"*{dt}",
        "v_ptr": f"*{dt}",
        "w_ptr": f"*{dt}",
        "f_ptr": f"*{spec.f_dtype}",
        "checkpoints_ptr": "*fp32",
        "dy_ptr": f"*{dt}",
        "dh_final_ptr": "*fp32",
        "dq_ptr": f"*{dt}",
        "dk_ptr": f"*{dt}",
        "dv_ptr": f"*{dt}",
        "df_ptr": "*fp32",
        "dw_ptr": "*fp32",
        "dh0_ptr": "*fp32",
        "starts_ptr": "*fp32",
    }
    constexprs = {
        "S": spec.seq_len,
        "TOKENS": spec.batch * spec.seq_len,
        "N": spec.num_heads,
        "K": spec.k_dim,
        "V": spec.v_dim,
        "GQ": spec.group_q,
        "GK": spec.group_k,
        "GV": spec.group_v,
        "GF": spec.group_f,
        "GW": spec.group_w,
        "C": spec.chunk_size,
        "ROWS": spec.rows,
        "RB": spec.block,
        "USE_CLIP": spec.clip is not None,
        "CLIP": float(abs(spec.clip)) if spec.clip is not None else 0.0,
        "ROW_VEC": staging_vector(spec.block, spec.rows),
        "COL_VEC": staging_vector(spec.block, spec.v_dim),
        "F32_PHASE": max(1, 128 // (4 * spec.v_dim)),
        "LOW_PHASE": max(1, 128 // (2 * spec.v_dim)),
    } | tanh_constexprs(spec.tanh)
    return compile_gluon(gluon_kernel(), pointers, constexprs, arch, max_registers=MAX_REGISTERS)


def m2rnn_backward_gluon(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    checkpoints: jax.Array,
    dy: jax.Array,
    dh_final: jax.Array,
    *,
    chunk_size: int,
    rows: int,
    block: int,
    clip: float | None,
    tanh: str = "mixed",
) -> tuple[jax.Array, ...]:
    """Gradients of the recurrence over B dense sequences of S tokens packed as T = B * S.

    Args:
      q (T, Nq, K), k (T, Nk, K), v (T, Nv, V), w (Nw, V, V), f (T, Nf): as for ``m2rnn_forward_gluon``.
      checkpoints (B * ceil(S / C), N, K, V) float32: from the forward with chunk_size C.
      dy (T, N, V) in q's dtype; dh_final (B, N, K, V) float32.
      rows: state rows per program (a power of two >= 16 dividing K); block: steps recomputed at a time (divides
      C); clip: None or the state-cotangent clamp c; tanh: the recompute's tanh form (the forward's).

    Returns (as ``m2rnn_backward``, R = K // rows):
      dq (T, N, K), dk (T, N, K) in q's dtype, per output head; dv (R, T, N, V) in q's dtype; df (R, T, N)
      float32; dW (B, N, R, V, V) float32; dh0 (B, N, K, V) float32.
    """
    batch, num_heads, k_dim, v_dim = dh_final.shape
    tokens = q.shape[0]
    row_blocks = k_dim // rows
    spec = GluonBackwardSpec(
        seq_len=tokens // batch,
        num_heads=num_heads,
        k_dim=k_dim,
        v_dim=v_dim,
        group_q=num_heads // q.shape[1],
        group_k=num_heads // k.shape[1],
        group_v=num_heads // v.shape[1],
        group_f=num_heads // f.shape[1],
        group_w=num_heads // w.shape[0],
        chunk_size=chunk_size,
        dtype=triton_dtype(q.dtype),
        f_dtype=triton_dtype(f.dtype),
        batch=batch,
        rows=rows,
        block=block,
        clip=clip,
        tanh=tanh,
    )
    arch = compute_capability()
    compiled = compile_backward(spec, arch)
    programs = (batch, num_heads, row_blocks)
    out_shapes = (
        jax.ShapeDtypeStruct((tokens, num_heads, k_dim), q.dtype),
        jax.ShapeDtypeStruct((tokens, num_heads, k_dim), q.dtype),
        jax.ShapeDtypeStruct((row_blocks, tokens, num_heads, v_dim), q.dtype),
        jax.ShapeDtypeStruct((row_blocks, tokens, num_heads), jnp.float32),
        jax.ShapeDtypeStruct(programs + (v_dim, v_dim), jnp.float32),
        jax.ShapeDtypeStruct(dh_final.shape, jnp.float32),
        jax.ShapeDtypeStruct(programs + (chunk_size // block, rows, v_dim), jnp.float32),
    )
    dq, dk, dv, df, dw, dh0, _ = launch(
        compiled,
        (num_heads, batch, row_blocks),
        arch,
        q,
        k,
        v,
        w.astype(q.dtype),
        f,
        checkpoints,
        dy.astype(q.dtype),
        dh_final,
        out_shapes=out_shapes,
    )
    return dq, dk, dv, df, dw, dh0
