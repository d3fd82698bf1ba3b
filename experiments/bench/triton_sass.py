"""Static cost of the GPU kernels without a GPU: compile them for sm_90 and count SASS per time step.

    pip install --target /tmp/triton36 --no-deps triton==3.6.0      # the H200 box's Triton; only this tool needs it
    PYTHONPATH=.:/tmp/triton36 python -m experiments.bench.triton_sass --config '{"num_warps": 1}'

The Pallas kernels are lowered to Triton IR for CUDA on this (CPU) machine, compiled with Triton's own
``ptxas`` for sm_90 and disassembled with its ``cuobjdump``. The innermost loops of the SASS are the per-step
bodies of the recurrence; their instruction counts give an issue-slot estimate of the kernel time at the target
shape (warp-instructions / (132 SMs x 4 schedulers x clock)), the same arithmetic as the floor in RESULTS.md.
It cannot see latency stalls, so it is a lower bound, and it is no substitute for timing on the device; it is a
way to compare variants (tanh formula, warps per program, dot precision) when no GPU is lent.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration  # noqa: F401 (the hook below needs the module object)

from m2rnn_jax.ops.m2rnn.pallas_gpu import m2rnn_pallas_gpu
from m2rnn_jax.testing import cuda_lowering_without_a_gpu
from pallas_kernels.gpu.m2rnn_common import KernelConfig

H200_SCHEDULERS = 132 * 4
H200_CLOCK_HZ = 1.98e9
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def triton_modules(function, *specs: jax.ShapeDtypeStruct) -> dict[str, tuple[str, list]]:
    """Triton IR text and launch grid of every Pallas-Triton kernel of ``function`` lowered for CUDA (sm_90) at
    ``specs`` (no GPU needed), by kernel name."""
    modules = {}
    lowering = pallas_call_registration.lowering
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        name = re.search(r"tt.func public @(\w+)", text).group(1)
        modules[name] = (text, list(result.grid))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        with cuda_lowering_without_a_gpu():
            jax.jit(function).trace(*specs).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return modules


def lower_to_triton_ir(config: KernelConfig, shape: tuple[int, int, int, int, int]) -> dict[str, tuple[str, list]]:
    """Triton IR text and launch grid of the forward and backward kernels of a bf16 fwd+bwd call."""
    batch, seq_len, heads, k_dim, v_dim = shape
    dt = jnp.bfloat16
    specs = dict(
        q=jax.ShapeDtypeStruct((batch, seq_len, 1, k_dim), dt),
        k=jax.ShapeDtypeStruct((batch, seq_len, 1, k_dim), dt),
        v=jax.ShapeDtypeStruct((batch, seq_len, heads, v_dim), dt),
        W=jax.ShapeDtypeStruct((heads, v_dim, v_dim), dt),
        f=jax.ShapeDtypeStruct((batch, seq_len, heads), dt),
    )

    def fwd_bwd(a):
        fn = lambda a: m2rnn_pallas_gpu(
            a["q"],
            a["k"],
            a["v"],
            a["W"],
            a["f"],
            None,
            cu_seqlens=None,
            gradient_clipping=1.0,
            state_dtype=jnp.float32,
            interpret=False,
            config=config,
        )
        (y, h), pullback = jax.vjp(fn, a)
        return pullback((y, h))

    return triton_modules(fwd_bwd, specs)


def compile_to_sass(ttir: str, num_warps: int, num_stages: int, workdir: str) -> tuple[str, str, str]:
    """SASS text, resource usage line and TritonGPU IR (with layouts) of a Triton IR module compiled for sm_90."""
    import triton  # optional dependency of this tool only
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as fh:
        fh.write(ttir)
    kernel = triton.compile(
        path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(cubin, "wb") as fh:
        fh.write(kernel.asm["cubin"])
    sass, usage = disassemble(cubin)
    return sass, usage, kernel.asm["ttgir"]


def _nvidia_tool(name: str) -> str:
    """Path of one of the CUDA tools Triton ships (ptxas, cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: str) -> tuple[str, str]:
    """SASS text and resource usage line of a cubin file, with Triton's cuobjdump."""

    def cuobjdump(option: str) -> str:
        return subprocess.run(
            [_nvidia_tool("cuobjdump"), option, cubin], capture_output=True, text=True, check=True
        ).stdout

    return cuobjdump("--dump-sass"), cuobjdump("--dump-resource-usage").strip().splitlines()[-1].strip()


def instruction_count(sass: str) -> int:
    """SASS instructions in a disassembly (every addressed line whose opcode starts with a capital letter)."""
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?[A-Z]", sass))


def resources(usage: str) -> dict:
    """Registers and spilled bytes (stack frame and local memory) of a cuobjdump resource usage line."""
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    return {"registers": field("REG"), "spilled_bytes": field("STACK") + field("LOCAL")}


def report(title: str, rows: list[dict], json_path: str | None) -> None:
    """Prints ``title`` and one line per row (``key value | ...``); also writes the rows to ``json_path`` if given."""
    print(title)
    for row in rows:
        print(" | ".join(f"{key} {value}" for key, value in row.items()))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=1)


def innermost_loops(sass: str) -> list[dict]:
    """Innermost loops (backward branches that contain no other backward branch) with their opcode mix."""
    code = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(sass)]
    loops = []
    for address, opcode, operands in code:
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    out = []
    for lo, hi in inner:
        ops = collections.Counter(op.split(".")[0] for addr, op, _ in code if lo <= addr <= hi)
        out.append({"start": hex(lo), "instructions": sum(ops.values()), "mix": dict(ops.most_common())})
    return out


def analyse(config: KernelConfig, shape: tuple[int, int, int, int, int], keep: str | None = None) -> dict:
    batch, seq_len, heads, k_dim, v_dim = shape
    report = {"config": dataclasses.asdict(config), "shape": shape}
    rows = config.rows_per_program(k_dim)
    elements_per_thread = rows * v_dim / (32 * config.num_warps)
    for name, (ttir, grid) in lower_to_triton_ir(config, shape).items():
        with tempfile.TemporaryDirectory() as workdir:
            sass, usage, ttgir = compile_to_sass(ttir, config.num_warps, config.num_stages, workdir)
        if keep:
            for suffix, text in (("sass", sass), ("ttgir", ttgir)):
                with open(os.path.join(keep, f"{name}.{suffix}"), "w") as fh:
                    fh.write(text)
        loops = innermost_loops(sass)
        programs = grid[0] * grid[1] * grid[2]
        entry = {"resources": usage, "programs": programs, "loops": loops}
        # Every recurrence step evaluates one tanh per state element: 2 MUFU ops per element (exact), 1 (approx).
        # A loop's MUFU count therefore tells how many time steps one pass through it covers (the backward's
        # unrolled recompute block of r steps evaluates r of them).
        mufu_per_step = elements_per_thread * (1 if config.approx_tanh else 2)
        per_step = 0.0
        for loop in loops:
            tanh_steps = round(loop["mix"].get("MUFU", 0) / mufu_per_step)
            loop["time_steps"] = tanh_steps
            if tanh_steps:
                per_step += loop["instructions"] / loop["time_steps"]
        entry["per_step_warp_instructions"] = per_step
        entry["per_element_instructions"] = per_step / elements_per_thread
        entry["issue_bound_ms"] = (
            per_step * config.num_warps * programs * seq_len / (H200_SCHEDULERS * H200_CLOCK_HZ) * 1e3
        )
        report[name] = entry
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="{}", help="KernelConfig fields as JSON")
    parser.add_argument("--shape", default="[8, 4096, 84, 64, 16]", help="[B, S, N, K, V] as JSON")
    parser.add_argument("--keep", default=None, help="directory to keep the SASS files in")
    args = parser.parse_args(argv)
    report = analyse(KernelConfig(**json.loads(args.config)), tuple(json.loads(args.shape)), args.keep)
    print(json.dumps(report, indent=1))
    return 0


def ptx_to_sass(ptx: str, workdir: str, arch: str = "sm_90a") -> tuple[str, str]:
    """SASS text and resource usage line of a PTX module (a Gluon kernel's), with Triton's ptxas and cuobjdump."""
    src, cubin = os.path.join(workdir, "kernel.ptx"), os.path.join(workdir, "kernel.cubin")
    with open(src, "w") as fh:
        fh.write(ptx)
    subprocess.run([_nvidia_tool("ptxas"), f"-arch={arch}", src, "-o", cubin], check=True)
    return disassemble(cubin)


def gluon_report(ptx: str) -> dict:
    """Resource usage and the innermost loops (opcode mix) of a compiled Gluon kernel."""
    with tempfile.TemporaryDirectory() as workdir:
        sass, usage = ptx_to_sass(ptx, workdir)
    return {"resources": usage, "loops": innermost_loops(sass)}


if __name__ == "__main__":
    sys.exit(main())
