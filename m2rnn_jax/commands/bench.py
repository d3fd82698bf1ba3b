"""``m2rnn-jax bench``: time the M2RNN op's backends (``--shapes``) or a whole model preset (``--model``).

Op mode (the default) lives in :mod:`m2rnn_jax.bench.op`, model mode in :mod:`m2rnn_jax.bench.model`; both print a
table and optionally write the same numbers as JSON. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from m2rnn_jax.commands.arguments import (
    add_compile_cache_argument,
    check_backend_hardware,
    check_preset,
    positive_int,
)
from m2rnn_jax.commands.errors import fail

NAME = "bench"
SHAPE_NAMES = ("400m", "400m-b1", "400m-s16k", "400m-b1-s16k", "7b", "tiny", "state-tracking", "state-tracking-bf16")
DEFAULT_SHAPES = ("400m", "400m-b1", "400m-s16k")
DEFAULT_BATCH, DEFAULT_SEQ_LEN = 8, 4096  # the paper's 400M training shape
MODEL_ONLY = (
    "batch",
    "seq_len",
    "dtype",
    "remat",
    "head_statistics",
    "head_logits",
    "scan_layers",
    "step_only",
    "compile_only",
    "compile_cache",
    "set",
)
DTYPES = ("float32", "bfloat16", "float16", "float64")

DESCRIPTION = "Time the M2RNN op's backends (--shapes, the default mode) or a model preset (--model)."
EPILOG = """modes:
  op (default)   m2rnn-jax bench [--shapes 400m ...] [--backends pallas_gpu scan]
                 the M2RNN op alone: forward, forward+backward, ns per step, temporaries
  model          m2rnn-jax bench --model PRESET [--batch B --seq-len S --dtype bfloat16 --remat NAME]
                 every distinct block of the preset (and its mixer alone), the LM head + loss, the optimizer
                 update, and the whole train step (ms, tokens/s, MFU, peak memory, compile time) beside the
                 sum of its parts
presets: m2rnn-jax info --list"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        NAME,
        help="time the M2RNN op backends or a model preset's blocks and train step (table, optional JSON)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        choices=SHAPE_NAMES,
        help=f"op mode: named problem shapes (default: {' '.join(DEFAULT_SHAPES)})",
    )
    mode.add_argument(
        "--model",
        metavar="PRESET",
        default=None,
        help="model mode: benchmark this preset (names: m2rnn-jax info --list)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        metavar="BACKEND",
        help="op mode: backends to time (default: pallas_gpu and scan on a GPU, scan elsewhere)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="B",
        help=f"model mode: batch size (default {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        metavar="S",
        help=f"model mode: tokens per row (default {DEFAULT_SEQ_LEN})",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="model mode: compute dtype (default: the preset's; parameters stay in its param_dtype)",
    )
    p.add_argument(
        "--remat",
        default=None,
        metavar="NAME",
        help="model mode: activation checkpointing of each block, a choice of the model config's remat "
        "field: none, full, save_dots (default: the preset's)",
    )
    p.add_argument(
        "--head-statistics",
        default=None,
        metavar="NAME",
        help="model mode: the LM-head loss's softmax statistics, a choice of the model config's head_statistics "
        "field: two_pass, pallas_gpu, one_read, fused_matmul, auto (default: the preset's)",
    )
    p.add_argument(
        "--head-logits",
        default=None,
        metavar="NAME",
        help="model mode: the dtype the LM head's logits GEMM writes, the model config's head_logits field: "
        "float32, compute (the compute dtype, as the plain bf16 head; default: the preset's)",
    )
    p.add_argument(
        "--scan-layers",
        action="store_const",
        const=True,
        default=None,
        help="model mode: run each run of equal mixer letters, and each period of runs repeated back to back, as "
        "one lax.scan (the model config's scan_layers; default: the preset's)",
    )
    p.add_argument(
        "--step-only",
        action="store_const",
        const=True,
        default=None,
        help="model mode: time only the whole train step and the optimizer update (one compile; for "
        "comparing --remat or --batch choices)",
    )
    p.add_argument(
        "--compile-only",
        action="store_const",
        const=True,
        default=None,
        help="model mode: only compile the train step for abstract inputs (nothing allocated or run): compile "
        "seconds, memory per device and whether it fits, for presets larger than the device",
    )
    add_compile_cache_argument(
        p,
        default="none unless JAX_COMPILATION_CACHE_DIR is set; run twice with DIR to time a warm compile",
        prefix="model mode: ",
    )
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="model mode: override a field of the preset's model config, e.g. --set gated_deltanet.chunk_size=128 "
        "(repeatable; applied after the options above; the report lists them)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    p.add_argument("--iters", type=positive_int, default=10, metavar="N", help="calls per timed repeat (default 10)")
    p.add_argument(
        "--repeats", type=positive_int, default=5, metavar="R", help="timed repeats; the median is reported (default 5)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        given = [f"--{name.replace('_', '-')}" for name in MODEL_ONLY if getattr(args, name) is not None]
        if given:
            return fail(NAME, f"{', '.join(given)}: only with --model PRESET")
        from m2rnn_jax.bench import op

        try:
            for backend in args.backends or ():
                check_backend_hardware("--backends", backend)
        except ValueError as err:
            return fail(NAME, err)
        return op.run(
            args.shapes or DEFAULT_SHAPES, args.backends or op.default_backends(), args.json, args.iters, args.repeats
        )
    if args.backends is not None:
        return fail(NAME, "--backends: only in op mode (without --model)")
    if args.step_only and args.compile_only:
        return fail(NAME, "--compile-only: expected without --step-only (it runs nothing)")
    from m2rnn_jax.bench import model
    from m2rnn_jax.bench.report import write_json
    from m2rnn_jax.train.compile_cache import use_compile_cache

    try:
        check_preset("--model", args.model)
        if args.compile_cache is not None:
            use_compile_cache(args.compile_cache)
        overrides = args.set or []
        config = model.resolve_config(
            args.model, args.dtype, args.remat, args.head_statistics, args.scan_layers, args.head_logits, overrides
        )
    except ValueError as err:
        return fail(NAME, err)
    report = model.run_model_bench(
        args.model,
        config,
        args.batch or DEFAULT_BATCH,
        args.seq_len or DEFAULT_SEQ_LEN,
        model.Timing(args.iters, args.repeats),
        step_only=bool(args.step_only),
        compile_only=bool(args.compile_only),
    )
    report["overrides"] = overrides
    if overrides:
        print(f"overrides: {' '.join(overrides)}")
    print(model.format_compile_report(report) if args.compile_only else model.format_report(report))
    if args.json:
        write_json(args.json, report)
    failed = model.failed_parts(report)
    if failed:
        print(f"m2rnn-jax {NAME}: {len(failed)} part(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
