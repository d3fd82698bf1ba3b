"""Pieces shared by the Gluon (explicit register layout) forward and backward kernels: exact tanh forms, the jitted
per-step helpers, offline compilation to PTX and the launch description.

Triton is imported lazily: this module is importable without it; ``helpers()`` and ``compile_gluon`` need Triton 3.6.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.m2rnn_common import _TANH_PTX

# Exact tanh without the MUFU reciprocal: 1 - 2 / (1 + 2^(2 x log2 e)) with the reciprocal from an integer
# initial guess (relative error < 1/8) and three Newton steps on the FMA pipe (error ~1e-7, like rcp.approx). The
# exponent is clamped at 64 so the guess stays in range (tanh is exactly 1 there in float32). One special-function
# op per element instead of two: the forward is bound by the SFU (4 ops per scheduler per cycle) on H200.
_TANH_NEWTON_PTX = """{
  .reg .f32 t, d, nd, r, e;
  .reg .b32 bits;
  mul.ftz.f32 t, $1, 0f4038AA3B;
  min.ftz.f32 t, t, 0f42800000;
  ex2.approx.ftz.f32 t, t;
  add.ftz.f32 d, t, 0f3F800000;
  mov.b32 bits, d;
  sub.s32 bits, 0x7EF311C3, bits;
  mov.b32 r, bits;
  neg.ftz.f32 nd, d;
  fma.rn.ftz.f32 e, nd, r, 0f3F800000;
  fma.rn.ftz.f32 r, r, e, r;
  fma.rn.ftz.f32 e, nd, r, 0f3F800000;
  fma.rn.ftz.f32 r, r, e, r;
  fma.rn.ftz.f32 e, nd, r, 0f3F800000;
  fma.rn.ftz.f32 r, r, e, r;
  fma.rn.ftz.f32 $0, r, 0fC0000000, 0f3F800000;
}"""
# "mixed": of each pair of elements one takes the rcp form (2 special-function ops, 5 instructions) and one the
# Newton form (1 op, 14 instructions), to balance the SFU against the issue slots.


def _renumber(asm: str, out: str, inp: str) -> str:
    """Rename the output $0 and input $1 of a one-element asm block."""
    return asm.replace("$0", "@OUT").replace("$1", inp).replace("@OUT", out)


_TANH_MIXED_PTX = _renumber(_TANH_PTX, "$0", "$2") + "\n" + _renumber(_TANH_NEWTON_PTX, "$1", "$3")
TANH_FORMS = {
    "rcp": _TANH_PTX,
    "newton": _TANH_NEWTON_PTX,
    "mixed": _TANH_MIXED_PTX,
    "approx": "tanh.approx.f32 $0, $1;",
}


def tanh_constexprs(tanh: str) -> dict:
    """The compile-time constants TANH_ASM, TANH_CONSTRAINTS, TANH_PACK of a tanh form (one of ``TANH_FORMS``)."""
    return {
        "TANH_ASM": TANH_FORMS[tanh],
        "TANH_CONSTRAINTS": "=f,=f,f,f" if tanh == "mixed" else "=f,f",
        "TANH_PACK": 2 if tanh == "mixed" else 1,
    }


def staging_vector(steps: int, width: int) -> int:
    """Values per thread (at most 8: 16-byte loads) when one warp stages a (steps, width) block of inputs."""
    return max(1, min(8, steps * width // 32, width))


def helpers() -> types.ModuleType:
    """The jitted per-step helpers (``m2rnn_gluon_steps``; imports Triton)."""
    from pallas_kernels.gpu import m2rnn_gluon_steps

    return m2rnn_gluon_steps


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """What the launcher needs: PTX text, entry name, dynamic shared memory and warps per program."""

    ptx: str
    name: str
    shared_mem_bytes: int
    num_warps: int


def compile_gluon(
    kernel, pointers: dict[str, str], constexprs: dict, arch: int, max_registers: int | None = None
) -> CompiledKernel:
    """Compile a one-warp Gluon kernel to PTX (Triton 3.6; runs without a GPU); max_registers: ptxas cap per thread.

    pointers: parameter name -> Triton pointer type ("*bf16", ...), in the kernel's order; every pointer is
    16-byte aligned (XLA buffers), which lets Triton vectorise. constexprs: the compile-time parameters.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = dict(pointers) | {name: "constexpr" for name in constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers))}
    source = GluonASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 1, "maxnreg": max_registers}
    )
    return CompiledKernel(
        ptx=compiled.asm["ptx"], name=compiled.metadata.name, shared_mem_bytes=compiled.metadata.shared, num_warps=1
    )


def launch(compiled: CompiledKernel, grid: tuple[int, int, int], arch: int, *inputs, out_shapes):
    """Run a compiled kernel through jaxlib's Triton custom call (``triton_call``)."""
    from pallas_kernels.gpu.triton_call import KernelLaunch, triton_call

    spec = KernelLaunch(
        ptx=compiled.ptx,
        name=compiled.name,
        shared_mem_bytes=compiled.shared_mem_bytes,
        num_warps=compiled.num_warps,
        grid=grid,
        compute_capability=arch,
    )
    return triton_call(spec, *inputs, out_shapes=out_shapes)


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def triton_dtype(dtype) -> str:
    """Triton's name of a JAX dtype: bf16, fp16 or fp32."""
    return _DTYPE_NAMES[jnp.dtype(dtype).name]


def compute_capability() -> int:
    """Compute capability of the first device as an integer (90 for the H100/H200); 90 where none is visible."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return int(float(capability) * 10) if capability else 90
