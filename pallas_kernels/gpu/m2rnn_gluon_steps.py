"""The per-step pieces of the Gluon kernels (``m2rnn_forward_gluon``, ``m2rnn_backward_gluon``): one step of the
recurrence, and the staging of a block of steps' inputs through shared memory.

Why staging: a load issued one step ahead of its use into registers is not enough. ptxas places the conversion (or
the packing of two 16-bit values into one register) of a loaded value right after the load, and then the warp
waits for the load right there (ncu, H200 runs 13-16: a third to two thirds of the forward's stall samples). A
block of steps loaded into registers one block ahead and stored to shared memory at the block's start hides the
load behind a whole block; per step the warp reads shared memory only.

Imports Triton 3.6 at import time: only loaded where a kernel is compiled (``m2rnn_gluon_common.helpers``).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.jit
def recurrence_step(
    h,
    w,
    k,
    v,
    f,
    A_LAYOUT: gl.constexpr,
    TANH_ASM: gl.constexpr,
    TANH_CONSTRAINTS: gl.constexpr,
    TANH_PACK: gl.constexpr,
):
    """(rows, V) float32 state in the mma accumulator layout -> (Z_t, H_t): Z_t = tanh(H W + k v^T) with W
    (V, V) in the B-operand layout and H rounded to W's dtype as the A operand; H_t = Z_t + f (H - Z_t).
    k (rows,), v (V,) in the slice layouts of the accumulator layout, f broadcastable to (rows, V); float32."""
    write = k[:, None] * v[None, :]
    pre = mma_v2(gl.convert_layout(h.to(w.dtype), A_LAYOUT), w, write)
    z = gl.inline_asm_elementwise(TANH_ASM, TANH_CONSTRAINTS, [pre], dtype=gl.float32, is_pure=True, pack=TANH_PACK)
    return z, z + f * (h - z)


@gluon.jit
def load_block(
    q_ptr,
    k_ptr,
    v_ptr,
    f_ptr,
    first_tok,
    t0,
    S: gl.constexpr,
    n,
    kb,
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
    TB: gl.constexpr,
    ROW_STAGE: gl.constexpr,
    COL_STAGE: gl.constexpr,
):
    """q, k (TB, ROWS) of rows kb * ROWS + [0, ROWS), v (TB, V) and f (TB, V) (f_t repeated along V) of steps
    t0 .. t0 + TB - 1 for output head n, in the staging register layouts ROW_STAGE and COL_STAGE (16-byte loads where
    the data is contiguous). Outside steps 0 .. S - 1, q, k, v are 0 and f is 1: such a step keeps the state (up to
    rounding) and passes the state cotangent through."""
    steps_r = t0 + gl.arange(0, TB, layout=gl.SliceLayout(1, ROW_STAGE))
    rows = kb * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, ROW_STAGE))
    tok_r = (first_tok + steps_r)[:, None]
    mask_r = ((steps_r >= 0) & (steps_r < S))[:, None] & (rows < K)[None, :]
    q = gl.load(q_ptr + (tok_r * NQ + n // GQ) * K + rows[None, :], mask=mask_r, other=0.0)
    k = gl.load(k_ptr + (tok_r * NK + n // GK) * K + rows[None, :], mask=mask_r, other=0.0)
    steps_c = t0 + gl.arange(0, TB, layout=gl.SliceLayout(1, COL_STAGE))
    cols = gl.arange(0, V, layout=gl.SliceLayout(0, COL_STAGE))
    tok_c = (first_tok + steps_c)[:, None]
    mask_c = ((steps_c >= 0) & (steps_c < S))[:, None] & (cols < V)[None, :]
    v = gl.load(v_ptr + (tok_c * NV + n // GV) * V + cols[None, :], mask=mask_c, other=0.0)
    f = gl.load(f_ptr + tok_c * NF + n // GF + 0 * cols[None, :], mask=mask_c, other=1.0)
    return q, k, v, f


@gluon.jit
def stage_block(q_smem, k_smem, v_smem, f_smem, q, k, v, f):
    """Store a ``load_block`` block into shared memory and make it visible to the whole warp."""
    q_smem.store(q)
    k_smem.store(k)
    v_smem.store(v)
    f_smem.store(f)
    gl.thread_barrier()


@gluon.jit
def staged_step(q_smem, k_smem, v_smem, f_smem, s, ROW_LAYOUT: gl.constexpr, COL_LAYOUT: gl.constexpr):
    """q_t, k_t (ROWS,) in ROW_LAYOUT, v_t and f_t (V,) in COL_LAYOUT of step s of a staged block, in float32."""
    q = step_view(q_smem).index(s).load(ROW_LAYOUT).to(gl.float32)
    k = step_view(k_smem).index(s).load(ROW_LAYOUT).to(gl.float32)
    v = step_view(v_smem).index(s).load(COL_LAYOUT).to(gl.float32)
    f = step_view(f_smem).index(s).load(COL_LAYOUT).to(gl.float32)
    return q, k, v, f


@gluon.jit
def step_view(smem):
    """The (steps, n) row-major buffer ``smem`` with a one-dimensional layout, so that ``index(s)`` gives step s."""
    return smem._reinterpret(
        smem.dtype, smem.shape, gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    )
