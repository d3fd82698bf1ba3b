"""Static cost of the GDN output and walk-cotangent kernels without a GPU: registers, spills and SASS instructions
of one program at each launch of gdn_check.py's sweep, compiled for sm_90.

    PYTHONPATH=. python -m experiments.bench.gdn_sass                       # C=64, K=256, V=512 bf16
    PYTHONPATH=. python -m experiments.bench.gdn_sass --json gdn_sass.json

Each kernel is lowered to Triton IR for CUDA on this machine and compiled with Triton's ptxas
(:mod:`experiments.bench.triton_sass`; Triton 3.6, the GPU box's). A launch that spills registers is slower than
its timing alone suggests on another shape; this shows which of the sweep's launches compile clean, not which is
fastest (gdn_check.py times them on the device).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from experiments.bench.gdn_check import FACTOR_COTANGENTS_SWEEP, OUTPUTS_SWEEP, WALK_COTANGENTS_SWEEP, config_label
from experiments.bench.triton_sass import compile_to_sass, instruction_count, report, resources, triton_modules
from pallas_kernels.gpu.gdn_chunk_outputs import (
    DEFAULT_FACTOR_COTANGENTS_CONFIG,
    DEFAULT_FORWARD_CONFIG,
    DEFAULT_STATE_COTANGENTS_CONFIG,
    chunk_outputs_backward,
    chunk_outputs_forward,
)
from pallas_kernels.gpu.gdn_walk_cotangents import WalkCotangentsKernelConfig, walk_input_cotangents


def compiled_cost(function: Callable, specs: Sequence[jax.ShapeDtypeStruct], kernel: str, config) -> dict:
    """Registers, spilled bytes, SASS instructions and whether the warpgroup matrix unit (HGMMA) is used, of the
    one Pallas kernel of ``function`` whose name holds ``kernel``, compiled at ``config``'s warps and stages."""
    modules = triton_modules(function, *specs)
    matches = [ttir for name, (ttir, _) in modules.items() if kernel in name]
    if len(matches) != 1:
        raise ValueError(f"kernel: expected one lowered kernel named like {kernel!r}, got {sorted(modules)}")
    with tempfile.TemporaryDirectory() as workdir:
        sass, usage, _ = compile_to_sass(matches[0], config.num_warps, config.num_stages, workdir)
    return resources(usage) | {"instructions": instruction_count(sass), "hgmma": "HGMMA" in sass}


def kernel_costs(chunk: int, k_dim: int, v_dim: int, *, sweep: bool = True) -> list[dict]:
    """One row per (kernel, launch): the four kernels at their default launches, and (``sweep``) at every other
    launch of gdn_check.py's sweep. bf16 operands, one sequence of two heads and four chunks (the per-program
    cost does not depend on the grid)."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    spec = lambda *shape, dtype=bf16: jax.ShapeDtypeStruct((1, 2, 4, *shape), dtype)  # noqa: E731
    qd, qk, starts, w = spec(chunk, k_dim), spec(chunk, chunk, dtype=f32), spec(k_dim, v_dim), spec(chunk, v_dim)
    do = jax.ShapeDtypeStruct((1, 4, chunk, 2, v_dim), bf16)
    kernels = {  # name -> (default launch, the sweep's launches, the kernel name, the call at one launch, its inputs)
        "outputs_forward": (
            DEFAULT_FORWARD_CONFIG,
            OUTPUTS_SWEEP,
            "forward",
            lambda cfg: lambda *a: chunk_outputs_forward(*a, out_dtype=bf16, config=cfg),
            (qd, qk, starts, w),
        ),
        "state_cotangents": (
            DEFAULT_STATE_COTANGENTS_CONFIG,
            OUTPUTS_SWEEP,
            "state_cotangents",
            lambda cfg: lambda *a: chunk_outputs_backward(*a, state_config=cfg)[2:],
            (qd, qk, starts, w, do),
        ),
        "factor_cotangents": (
            DEFAULT_FACTOR_COTANGENTS_CONFIG,
            FACTOR_COTANGENTS_SWEEP,
            "factor_cotangents",
            lambda cfg: lambda *a: chunk_outputs_backward(*a, factor_config=cfg)[:2],
            (qd, qk, starts, w, do),
        ),
        "walk_cotangents": (
            WalkCotangentsKernelConfig(),
            WALK_COTANGENTS_SWEEP,
            "walk",
            lambda cfg: lambda *a: walk_input_cotangents(*a, config=cfg),
            (w, starts, w, starts),
        ),
    }
    rows = []
    for name, (default, launches, kernel, call_at, specs) in kernels.items():
        for config in [default] + [c for c in launches if sweep and c != default]:
            cost = compiled_cost(call_at(config), specs, kernel, config)
            rows.append({"kernel": name, "launch": config_label(config), "default": config == default} | cost)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--k-dim", type=int, default=256)
    parser.add_argument("--v-dim", type=int, default=512)
    parser.add_argument("--defaults-only", action="store_true", help="only the default launches")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = kernel_costs(args.chunk, args.k_dim, args.v_dim, sweep=not args.defaults_only)
    title = f"GDN output and walk-cotangent kernels, C={args.chunk} K={args.k_dim} V={args.v_dim} bf16, sm_90 (no GPU)"
    report(title, rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
