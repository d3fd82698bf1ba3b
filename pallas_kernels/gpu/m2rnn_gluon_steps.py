"""The per-step pieces of the Gluon kernels (``m2rnn_forward_gluon``, ``m2rnn_backward_gluon``): input loads that
leave each value in its own register, their float32 conversion, and one step of the recurrence.

Imports Triton 3.6 at import time: only loaded where a kernel is compiled (``m2rnn_gluon_common.helpers``).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.jit
def load_bits(ptrs):
    """The 16- or 32-bit values at ``ptrs`` as int32 registers, one value per register (``bits_to_float``
    converts them). Loaded ahead of their use, they must reach no instruction before it: a conversion or the
    packing of two 16-bit values into one register next to the load makes the warp wait for the load right
    there (ncu, H200 runs 13-14: a third to 42% of the forward's stall samples sat on such instructions)."""
    if ptrs.dtype.element_ty.primitive_bitwidth == 16:
        return gl.inline_asm_elementwise("ld.global.u16 $0, [$1];", "=r,l", [ptrs], dtype=gl.int32,
                                         is_pure=True, pack=1)
    else:
        return gl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [ptrs], dtype=gl.int32,
                                         is_pure=True, pack=1)

@gluon.jit
def bits_to_float(x, DTYPE: gl.constexpr):
    """float32 values of ``load_bits``' registers holding DTYPE (bfloat16, float16 or float32) values."""
    if DTYPE == gl.bfloat16:
        return (x << 16).to(gl.float32, bitcast=True)
    elif DTYPE == gl.float16:
        return gl.inline_asm_elementwise("{ .reg .b16 t; cvt.u16.u32 t, $1; cvt.f32.f16 $0, t; }", "=f,r", [x],
                                         dtype=gl.float32, is_pure=True, pack=1)
    else:
        return x.to(gl.float32, bitcast=True)

@gluon.jit
def load_step(q_ptr, k_ptr, v_ptr, f_ptr, tok, n, rows, cols, NQ: gl.constexpr, NK: gl.constexpr,
              NV: gl.constexpr, NF: gl.constexpr, GQ: gl.constexpr, GK: gl.constexpr, GV: gl.constexpr,
              GF: gl.constexpr, K: gl.constexpr, V: gl.constexpr):
    """q_t, k_t (rows,), v_t (V,) and f_t of token ``tok`` for output head n, as ``load_bits`` registers."""
    q = load_bits(q_ptr + (tok * NQ + n // GQ) * K + rows)
    k = load_bits(k_ptr + (tok * NK + n // GK) * K + rows)
    v = load_bits(v_ptr + (tok * NV + n // GV) * V + cols)
    f = load_bits(f_ptr + tok * NF + n // GF)
    return q, k, v, f

@gluon.jit
def load_reverse_step(q_ptr, k_ptr, v_ptr, f_ptr, dy_ptr, tok, n, rows, cols, N: gl.constexpr,
                      NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr, GQ: gl.constexpr,
                      GK: gl.constexpr, GV: gl.constexpr, GF: gl.constexpr, K: gl.constexpr, V: gl.constexpr):
    """``load_step``'s q_t, k_t, v_t, f_t and dy_t (V,) of token ``tok`` for head n, in their input dtypes."""
    q, k, v, f = load_step(q_ptr, k_ptr, v_ptr, f_ptr, tok, n, rows, cols, NQ, NK, NV, NF, GQ, GK, GV, GF, K, V)
    return q, k, v, f, load_bits(dy_ptr + (tok * N + n) * V + cols)


@gluon.jit
def recurrence_step(h, w, k, v, f, DTYPE: gl.constexpr, F_DTYPE: gl.constexpr, A_LAYOUT: gl.constexpr,
                    TANH_ASM: gl.constexpr, TANH_CONSTRAINTS: gl.constexpr, TANH_PACK: gl.constexpr):
    """(rows, V) float32 state in the mma accumulator layout -> (Z_t, H_t): Z_t = tanh(H W + k v^T) with W
    (V, V) in the B-operand layout and H rounded to W's dtype as the A operand; H_t = Z_t + f (H - Z_t).
    k, v (DTYPE) and f (F_DTYPE) as ``load_step`` returns them; float32 math."""
    f = bits_to_float(f, F_DTYPE)
    write = bits_to_float(k, DTYPE)[:, None] * bits_to_float(v, DTYPE)[None, :]
    pre = mma_v2(gl.convert_layout(h.to(w.dtype), A_LAYOUT), w, write)
    z = gl.inline_asm_elementwise(TANH_ASM, TANH_CONSTRAINTS, [pre], dtype=gl.float32, is_pure=True,
                                  pack=TANH_PACK)
    return z, z + f * (h - z)
