"""Static cost of the LM-head statistics kernels without a GPU: SASS instructions per logit, registers and the
issue-slot time of the two-pass kernel (``statistics="pallas_gpu"``) and the one-read kernel (``"one_read"``), and
the size of the fused logits GEMM (``"fused_matmul"``, its epilogue included).

    PYTHONPATH=. python -m experiments.bench.softmax_xent_sass                      # 4096 x 100352 bf16 logits
    PYTHONPATH=. python -m experiments.bench.softmax_xent_sass --configs 1x2048x4x2 2x1024x4x2 --json sass.json

Each kernel is lowered to Triton IR for CUDA on this machine and compiled for sm_90 with Triton's ptxas
(:mod:`experiments.bench.triton_sass`). Per logit: the instructions of the innermost loops over the elements one
thread owns in one step (both loops for the two-pass kernel); for the fused GEMM, the whole program's instructions
over the logits one thread owns (the K loop's wgmma and the epilogue together). Issue-slot time: warp
instructions / (132 SMs x 4 schedulers x 1.98 GHz), a lower bound beside the memory time (bytes / 4.8 TB/s); a way
to compare variants when no GPU is lent, not a timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from experiments.bench.triton_sass import (
    H200_CLOCK_HZ,
    H200_SCHEDULERS,
    compile_to_sass,
    innermost_loops,
    instruction_count,
    report,
    resources,
    triton_modules,
)
from m2rnn_jax.bench.loss import parse_kernel_config
from pallas_kernels.gpu.logits_softmax_tiles import default_config as default_tiles_config
from pallas_kernels.gpu.logits_softmax_tiles import logits_softmax_tiles
from pallas_kernels.gpu.softmax_xent import (
    SoftmaxXentConfig,
    default_config,
    default_one_read_config,
    softmax_cross_entropy,
)

H200_BYTES_PER_S = 4.8e12


def kernel_cost(rows: int, vocab: int, config: SoftmaxXentConfig, one_read: bool) -> dict:
    """Lowers and compiles one kernel (bf16 logits, the gradient in bf16) and returns its static cost."""
    specs = [jax.ShapeDtypeStruct((rows, vocab), jnp.bfloat16), jax.ShapeDtypeStruct((rows,), jnp.int32)]
    specs += [jax.ShapeDtypeStruct((rows,), jnp.float32)] * 2

    def call(logits, targets, weights, reference):
        return softmax_cross_entropy(
            logits, targets, weights, d_dtype=jnp.bfloat16, reference=reference if one_read else None, config=config
        )

    [(ttir, grid)] = triton_modules(call, *specs).values()
    with tempfile.TemporaryDirectory() as workdir:
        sass, usage, _ = compile_to_sass(ttir, config.num_warps, config.num_stages, workdir)
    loops = innermost_loops(sass)
    per_step = sum(loop["instructions"] for loop in loops)
    elements_per_thread = config.block_rows * config.block_v / (32 * config.num_warps)
    steps = -(-vocab // config.block_v)
    warp_instructions = grid[0] * config.num_warps * steps * per_step
    passes = 1 if one_read else 2  # logit reads (the gradient or D written once, in the compute dtype)
    return {
        "kernel": "one_read" if one_read else "two_pass",
        "config": f"{config.block_rows}x{config.block_v}x{config.num_warps}x{config.num_stages}",
        "instructions_per_logit": round(per_step / elements_per_thread, 2),
        **resources(usage),
        "issue_ms": round(warp_instructions / (H200_SCHEDULERS * H200_CLOCK_HZ) * 1e3, 3),
        "memory_ms": round(rows * vocab * 2 * (passes + 1) / H200_BYTES_PER_S * 1e3, 3),
    }


def fused_gemm_cost(rows: int, depth: int, vocab: int) -> dict:
    """The fused logits GEMM at its default configuration (bf16 inputs, E written): SASS instructions of one program
    in all, per logit one thread owns, and its registers and spills."""
    config = default_tiles_config(rows, depth, vocab)
    specs = [jax.ShapeDtypeStruct((rows, depth), jnp.bfloat16), jax.ShapeDtypeStruct((depth, vocab), jnp.bfloat16)]
    specs += [jax.ShapeDtypeStruct((rows,), jnp.float32)]
    [(ttir, _)] = triton_modules(lambda x, w, c: logits_softmax_tiles(x, w, c, config=config), *specs).values()
    with tempfile.TemporaryDirectory() as workdir:
        sass, usage, _ = compile_to_sass(ttir, config.num_warps, config.num_stages, workdir)
    instructions = instruction_count(sass)
    logits_per_thread = config.block_rows * config.block_v / (32 * config.num_warps)
    config_text = f"{config.block_rows}x{config.block_v}x{config.block_k}x{config.num_warps}x{config.num_stages}"
    return {
        "kernel": "fused_matmul",
        "config": config_text,
        "program_instructions": instructions,
        "instructions_per_logit": round(instructions / logits_per_thread, 2),
    } | resources(usage)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="rows (tokens) of the chunk")
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument(
        "--configs",
        nargs="*",
        default=[],
        metavar="ROWSxCOLSxWARPSxSTAGES",
        help="one-read kernel launch parameters to compare (default: its default); the two-pass kernel runs at its "
        "default",
    )
    parser.add_argument("--hidden", type=int, default=1024, help="the fused GEMM's depth (the model width)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    configs = [parse_kernel_config(text) for text in args.configs] or [default_one_read_config(args.vocab)]
    rows = [kernel_cost(args.rows, args.vocab, default_config(args.rows, args.vocab), one_read=False)]
    rows += [kernel_cost(args.rows, args.vocab, config, one_read=True) for config in configs]
    rows.append(fused_gemm_cost(args.rows, args.hidden, args.vocab))
    title = f"Statistics kernels, {args.rows} x {args.vocab} bfloat16 logits, compiled for sm_90 (no GPU)"
    report(title, rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
