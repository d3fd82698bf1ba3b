"""Fused M2RNN forward kernel with explicit register layouts (Gluon, Triton 3.6), for dense bf16/f16 inputs.

One warp per (sequence b, output head n, block of ``rows`` state rows) runs the whole time loop with nothing in
shared memory (rows < K: y comes as float32 partials per row block, summed outside):

* the state H (K, V) in float32 lives in the accumulator layout of ``mma.m16n8k16`` (NVMMA v2);
* each step rounds H to the input dtype and converts it to the A-operand layout, which for 16-bit operands is a
  register-only conversion (the FlashAttention-2 accumulator -> operand shortcut), and W (V, V) sits in registers
  in the B-operand layout for the whole loop;
* k_t (rows) and v_t (columns) are loaded straight into the slices of the accumulator layout, so the write
  k_t v_t^T is the accumulator input of the mma: Z_t = tanh(mma(H, W, k_t v_t^T));
* y_t = q_t^T H_t is a reduction over rows inside one warp (register sums and shuffles, no barrier);
* the inputs of step t + 1 are loaded during step t.

Besides y and the final state it stores the float32 state at the start of every ``chunk_size`` steps, in the
layout both backwards read (``m2rnn_backward``, ``m2rnn_backward_gluon``): checkpoints (B * ceil(S / C),
N, K, V), slot b * ceil(S / C) + c for chunk c of sequence b.

Triton is imported lazily: this module is only loaded where the kernel is compiled (a machine with Triton 3.6).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.m2rnn_gluon_common import (
    TANH_FORMS,
    CompiledKernel,
    compile_gluon,
    compute_capability,
    helpers,
    launch,
    staging_vector,
    tanh_constexprs,
    triton_dtype,
)

# inputs are staged through shared memory in blocks of this many steps (or gcd with the chunk size)
STAGED_STEPS = 16

__all__ = ["TANH_FORMS", "CompiledKernel", "GluonForwardSpec", "compile_forward", "m2rnn_forward_gluon"]


@dataclasses.dataclass(frozen=True)
class GluonForwardSpec:
    """Static description of one compiled forward kernel (hashable: it keys the compile cache).

    seq_len S, num_heads N, k_dim K and v_dim V (powers of two, 16 <= K <= 128, V in {16, 32}); head group sizes
    (output head n reads source head n // group_x); chunk_size C of the checkpoints; dtype of q/k/v/f/W ("bf16" or
    "fp16"; W is passed in that dtype), of f ("bf16", "fp16" or "fp32"); whether checkpoints are stored;
    the batch B; rows: state rows per program (None = K; fewer rows = more programs, y as float32 partials per
    row block); tanh: one of ``TANH_FORMS``.
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
    save_checkpoints: bool
    batch: int = 1
    rows: int | None = None
    tanh: str = "newton"


def _kernel():
    """Build the Gluon kernel (imports Triton; called once)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    common = helpers()
    load_block = common.load_block
    stage_block = common.stage_block
    staged_step = common.staged_step
    recurrence_step = common.recurrence_step

    @gluon.jit
    def run_block(
        h,
        w,
        j,
        q_smem,
        k_smem,
        v_smem,
        f_smem,
        q_blk,
        k_blk,
        v_blk,
        f_blk,
        q_ptr,
        k_ptr,
        v_ptr,
        f_ptr,
        y_ptr,
        checkpoints_ptr,
        first_tok,
        b,
        n,
        kb,
        state_offsets,
        cols,
        S: gl.constexpr,
        TOKENS: gl.constexpr,
        N: gl.constexpr,
        K: gl.constexpr,
        V: gl.constexpr,
        NQ: gl.constexpr,
        NK: gl.constexpr,
        NV: gl.constexpr,
        NF: gl.constexpr,
        GQ: gl.constexpr,
        GK: gl.constexpr,
        GV: gl.constexpr,
        GF: gl.constexpr,
        C: gl.constexpr,
        ROWS: gl.constexpr,
        SAVE: gl.constexpr,
        TB: gl.constexpr,
        A_LAYOUT: gl.constexpr,
        ROW_LAYOUT: gl.constexpr,
        COL_LAYOUT: gl.constexpr,
        ROW_STAGE: gl.constexpr,
        COL_STAGE: gl.constexpr,
        TANH_ASM: gl.constexpr,
        TANH_CONSTRAINTS: gl.constexpr,
        TANH_PACK: gl.constexpr,
    ):
        """Block j (steps j TB .. j TB + TB - 1) from its staged inputs (``q_blk`` ...: loaded during block j - 1)
        through the stage buffers ``q_smem`` ...; returns the state and the inputs of block j + 1."""
        if SAVE:
            if (j * TB) % C == 0:
                slot = (b * ((S + C - 1) // C) + (j * TB) // C).to(gl.int64) * N + n
                gl.store(checkpoints_ptr + slot * K * V + state_offsets, h)
        stage_block(q_smem, k_smem, v_smem, f_smem, q_blk, k_blk, v_blk, f_blk)
        q_blk, k_blk, v_blk, f_blk = load_block(
            q_ptr,
            k_ptr,
            v_ptr,
            f_ptr,
            first_tok,
            (j + 1) * TB,
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
            TB,
            ROW_STAGE,
            COL_STAGE,
        )
        for s in range(gl.minimum(TB, S - j * TB)):
            q, k, v, f = staged_step(q_smem, k_smem, v_smem, f_smem, s, ROW_LAYOUT, COL_LAYOUT)
            _, h = recurrence_step(h, w, k, v, f[None, :], A_LAYOUT, TANH_ASM, TANH_CONSTRAINTS, TANH_PACK)
            y = gl.sum(q[:, None] * h, axis=0)
            tok = first_tok + j * TB + s
            gl.store(y_ptr + ((kb * TOKENS + tok).to(gl.int64) * N + n) * V + cols, y.to(y_ptr.dtype.element_ty))
        return h, q_blk, k_blk, v_blk, f_blk

    @gluon.jit
    def m2rnn_forward_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        w_ptr,
        f_ptr,
        h0_ptr,  # inputs
        y_ptr,
        h_final_ptr,
        checkpoints_ptr,  # outputs
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
        SAVE: gl.constexpr,
        TANH_ASM: gl.constexpr,
        TANH_CONSTRAINTS: gl.constexpr,
        TANH_PACK: gl.constexpr,
        TB: gl.constexpr,
        ROW_VEC: gl.constexpr,
        COL_VEC: gl.constexpr,
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
        NQ: gl.constexpr = N // GQ
        NK: gl.constexpr = N // GK
        NV: gl.constexpr = N // GV
        NF: gl.constexpr = N // GF
        NUM_BLOCKS: gl.constexpr = (S + TB - 1) // TB

        n = gl.program_id(0)
        b = gl.program_id(1)
        kb = gl.program_id(2)
        rows = kb * ROWS + gl.arange(0, ROWS, layout=row_layout)
        cols = gl.arange(0, V, layout=col_layout)
        state_offsets = rows[:, None] * V + cols[None, :]  # (ROWS, V) in the accumulator layout

        w_rows = gl.arange(0, V, layout=gl.SliceLayout(1, b_layout))
        w_cols = gl.arange(0, V, layout=gl.SliceLayout(0, b_layout))
        w = gl.load(w_ptr + (n // GW) * V * V + w_rows[:, None] * V + w_cols[None, :])

        head_state = (b * N + n).to(gl.int64) * K * V
        h = gl.load(h0_ptr + head_state + state_offsets)

        # Inputs go through shared memory a block of TB steps at a time: block j + 1 is loaded into registers
        # while block j runs (its load latency hidden by TB steps), then stored into the other of two stages
        # (even blocks use the buffers q0 ..., odd blocks q1 ...; the loop runs over pairs of blocks).
        q0 = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [TB, ROWS], smem_layout)
        k0 = gl.allocate_shared_memory(k_ptr.dtype.element_ty, [TB, ROWS], smem_layout)
        v0 = gl.allocate_shared_memory(v_ptr.dtype.element_ty, [TB, V], smem_layout)
        f0 = gl.allocate_shared_memory(f_ptr.dtype.element_ty, [TB, V], smem_layout)
        q1 = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [TB, ROWS], smem_layout)
        k1 = gl.allocate_shared_memory(k_ptr.dtype.element_ty, [TB, ROWS], smem_layout)
        v1 = gl.allocate_shared_memory(v_ptr.dtype.element_ty, [TB, V], smem_layout)
        f1 = gl.allocate_shared_memory(f_ptr.dtype.element_ty, [TB, V], smem_layout)
        first_tok = b * S
        q_blk, k_blk, v_blk, f_blk = load_block(
            q_ptr,
            k_ptr,
            v_ptr,
            f_ptr,
            first_tok,
            0,
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
            TB,
            row_stage,
            col_stage,
        )
        for j in range(0, NUM_BLOCKS, 2):
            h, q_blk, k_blk, v_blk, f_blk = run_block(
                h,
                w,
                j,
                q0,
                k0,
                v0,
                f0,
                q_blk,
                k_blk,
                v_blk,
                f_blk,
                q_ptr,
                k_ptr,
                v_ptr,
                f_ptr,
                y_ptr,
                checkpoints_ptr,
                first_tok,
                b,
                n,
                kb,
                state_offsets,
                cols,
                S,
                TOKENS,
                N,
                K,
                V,
                NQ,
                NK,
                NV,
                NF,
                GQ,
                GK,
                GV,
                GF,
                C,
                ROWS,
                SAVE,
                TB,
                a_layout,
                row_layout,
                col_layout,
                row_stage,
                col_stage,
                TANH_ASM,
                TANH_CONSTRAINTS,
                TANH_PACK,
            )
            if j + 1 < NUM_BLOCKS:
                h, q_blk, k_blk, v_blk, f_blk = run_block(
                    h,
                    w,
                    j + 1,
                    q1,
                    k1,
                    v1,
                    f1,
                    q_blk,
                    k_blk,
                    v_blk,
                    f_blk,
                    q_ptr,
                    k_ptr,
                    v_ptr,
                    f_ptr,
                    y_ptr,
                    checkpoints_ptr,
                    first_tok,
                    b,
                    n,
                    kb,
                    state_offsets,
                    cols,
                    S,
                    TOKENS,
                    N,
                    K,
                    V,
                    NQ,
                    NK,
                    NV,
                    NF,
                    GQ,
                    GK,
                    GV,
                    GF,
                    C,
                    ROWS,
                    SAVE,
                    TB,
                    a_layout,
                    row_layout,
                    col_layout,
                    row_stage,
                    col_stage,
                    TANH_ASM,
                    TANH_CONSTRAINTS,
                    TANH_PACK,
                )
        gl.store(h_final_ptr + head_state + state_offsets, h)

    return m2rnn_forward_kernel


@functools.cache
def gluon_kernel():
    return _kernel()


@functools.cache
def compile_forward(spec: GluonForwardSpec, arch: int = 90) -> CompiledKernel:
    """Compile the kernel for ``spec`` to PTX (Triton 3.6; runs without a GPU)."""
    dt = spec.dtype
    pointers = {
        "q_ptr": f"*{dt}",
        "k_ptr": f"*{dt}",
        "v_ptr": f"*{dt}",
        "w_ptr": f"*{dt}",
        "f_ptr": f"*{spec.f_dtype}",
        "h0_ptr": "*fp32",
        "y_ptr": "*fp32" if spec.rows and spec.rows < spec.k_dim else f"*{dt}",
        "h_final_ptr": "*fp32",
        "checkpoints_ptr": "*fp32",
    }
    rows = spec.rows or spec.k_dim
    staged_steps = math.gcd(STAGED_STEPS, spec.chunk_size)
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
        "ROWS": rows,
        "SAVE": spec.save_checkpoints,
        "TB": staged_steps,
        "ROW_VEC": staging_vector(staged_steps, rows),
        "COL_VEC": staging_vector(staged_steps, spec.v_dim),
    } | tanh_constexprs(spec.tanh)
    return compile_gluon(gluon_kernel(), pointers, constexprs, arch)


def m2rnn_forward_gluon(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    h0: jax.Array,
    *,
    chunk_size: int,
    save_checkpoints: bool,
    rows: int | None = None,
    tanh: str = "newton",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Run the recurrence over B dense sequences of S tokens packed as T = B * S.

    Args:
      q (T, Nq, K), k (T, Nk, K), v (T, Nv, V): bf16 or f16, K in {16, 32, 64, 128}, V == 16.
      w (Nw, V, V) in q's dtype; f (T, Nf) in bf16, f16 or f32; h0 (B, N, K, V) float32.
      rows: state rows per program (a power of two >= 16 dividing K; None = K); tanh: one of ``TANH_FORMS``.

    Returns:
      y (T, N, V) in q's dtype (summed over row blocks in float32 when rows < K), h_final (B, N, K, V) float32,
      and checkpoints (B * ceil(S / C), N, K, V) float32
      (the state at the start of every chunk of C = chunk_size steps) or None.
    """
    batch, num_heads, k_dim, v_dim = h0.shape
    tokens = q.shape[0]
    seq_len = tokens // batch
    rows = k_dim if rows is None else min(rows, k_dim)
    row_blocks = k_dim // rows
    spec = GluonForwardSpec(
        seq_len=seq_len,
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
        save_checkpoints=save_checkpoints,
        batch=batch,
        rows=rows,
        tanh=tanh,
    )
    arch = compute_capability()
    compiled = compile_forward(spec, arch)
    num_slots = batch * -(-seq_len // chunk_size) if save_checkpoints else 1
    out_shapes = (
        jax.ShapeDtypeStruct((row_blocks, tokens, num_heads, v_dim), q.dtype if row_blocks == 1 else jnp.float32),
        jax.ShapeDtypeStruct(h0.shape, jnp.float32),
        jax.ShapeDtypeStruct((num_slots, num_heads, k_dim, v_dim) if save_checkpoints else (1,), jnp.float32),
    )
    y, h_final, checkpoints = launch(
        compiled, (num_heads, batch, row_blocks), arch, q, k, v, w.astype(q.dtype), f, h0, out_shapes=out_shapes
    )
    y = y[0] if row_blocks == 1 else y.sum(axis=0).astype(q.dtype)
    return y, h_final, checkpoints if save_checkpoints else None
