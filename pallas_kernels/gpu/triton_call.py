"""Launch a precompiled Triton/Gluon kernel (PTX) from JAX through jaxlib's Triton custom call.

jaxlib's CUDA plugin registers the custom call target ``triton_kernel_call`` (legacy API): its opaque backend
config is a zlib-compressed ``TritonKernelCall`` proto holding the PTX, the launch grid and one parameter entry
per buffer (inputs, then outputs). At run time jaxlib compiles the PTX with ptxas once, then launches the kernel
with the buffers in operand order, followed by the two null scratch pointers of Triton's kernel ABI (so the
kernel must need no global scratch memory).

Only array parameters are supported (pass sizes as compile-time constants). The primitive has no CPU lowering:
callers choose this path only on NVIDIA GPUs.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import jax
from jax.extend import core as jex_core
from jax.interpreters import mlir

_TARGET = "triton_kernel_call"


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """A compiled kernel and how to launch it: PTX text, entry name, shared memory bytes, warps, grid (x, y, z)."""

    ptx: str
    name: str
    shared_mem_bytes: int
    num_warps: int
    grid: tuple[int, int, int]
    compute_capability: int = 90


def backend_config(launch: KernelLaunch, num_buffers: int) -> bytes:
    """The zlib-compressed kernel-call proto for ``num_buffers`` array parameters (needs jaxlib's CUDA plugin)."""
    from jax._src.lib import gpu_triton as lib  # present where the CUDA plugin is installed

    kernel = lib.TritonKernel(
        launch.name, launch.num_warps, 1, launch.shared_mem_bytes, launch.ptx, "", launch.compute_capability
    )
    params = [lib.create_array_parameter(0, 16) for _ in range(num_buffers)]
    call = lib.TritonKernelCall(kernel, *launch.grid, params)
    return zlib.compress(call.to_proto(launch.name, b""))


triton_call_p = jex_core.Primitive("m2rnn_triton_call")
triton_call_p.multiple_results = True


@triton_call_p.def_abstract_eval
def _abstract_eval(*_, launch: KernelLaunch, out_shapes: tuple[jax.ShapeDtypeStruct, ...]):
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in out_shapes]


def _lowering(ctx, *args, launch: KernelLaunch, out_shapes):
    config = backend_config(launch, len(args) + len(out_shapes))
    rule = jax.ffi.ffi_lowering(_TARGET, api_version=2, backend_config=config)
    return rule(ctx, *args)


mlir.register_lowering(triton_call_p, _lowering, platform="cuda")


def triton_call(
    launch: KernelLaunch, *inputs: jax.Array, out_shapes: Sequence[jax.ShapeDtypeStruct]
) -> list[jax.Array]:
    """Run the kernel on ``inputs`` (row-major, 16-byte aligned device buffers); returns arrays of ``out_shapes``.

    The kernel's pointer arguments are the inputs in order, then the outputs; every output element must be written
    by the kernel (outputs are not zeroed).
    """
    return triton_call_p.bind(*inputs, launch=launch, out_shapes=tuple(out_shapes))
