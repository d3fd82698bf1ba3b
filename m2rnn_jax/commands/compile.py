"""``m2rnn-jax compile``: compile a preset's train step ahead of time for a TPU topology; memory, FLOPs, collectives.

The work is done by :mod:`m2rnn_jax.bench.compile`; see ``docs/tpu_pods.md``. Exit status: 0 the step compiles and
fits the chip's HBM, 1 it does not fit (or the compiler failed), 2 a bad request (mesh, topology, no libtpu).
"""

from __future__ import annotations

import argparse
from typing import Any

from m2rnn_jax.commands.arguments import positive_int
from m2rnn_jax.commands.errors import fail

NAME = "compile"
EPILOG = """example (libtpu from .ci/install_tpu.sh):
  PYTHONPATH=.venv-tpu m2rnn-jax compile --preset hybrid-m2rnn-400m --topology v5e:2x4 \\
      --mesh data=2,fsdp=4 --batch 16 --seq-len 4096 --json out.json"""


def add_parser(subparsers: Any) -> None:
    from m2rnn_jax.models.config import REMAT_CHOICES

    p = subparsers.add_parser(
        NAME,
        help="compile a preset's train step ahead of time for a TPU pod topology (memory per chip, FLOPs, collectives)",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", required=True, help="model preset (m2rnn-jax info --list)")
    p.add_argument("--topology", required=True, help="TPU topology CHIP:DIMS, e.g. v5e:2x4, v5p:4x4x2, v6e:4x4")
    p.add_argument(
        "--mesh",
        required=True,
        help="AXIS=SIZE,... over data, fsdp, tensor, expert (missing axes are 1; one may be -1)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="B",
        help="global sequences per optimizer step (default: one per batch shard)",
    )
    p.add_argument("--seq-len", type=positive_int, default=4096, metavar="S", help="tokens per row (default 4096)")
    p.add_argument("--grad-accum", type=positive_int, default=1, metavar="N", help="micro-batches per step (default 1)")
    p.add_argument("--remat", choices=REMAT_CHOICES, default=None, help="activation checkpointing (default: preset's)")
    p.add_argument(
        "--layers",
        type=positive_int,
        default=None,
        metavar="N",
        help="compile only the first N blocks of the layer pattern (depth probes; default: all)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the preset's training config, e.g. --set model.vocab_size=4096 (repeatable)",
    )
    p.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip in GiB (default: the chip's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report to this JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.bench.compile import (
        CompileRequest,
        compile_train_step,
        format_report,
        parse_mesh,
        topology_devices,
    )
    from m2rnn_jax.bench.report import write_json
    from m2rnn_jax.parallel.mesh import resolve_mesh_shape

    try:
        mesh = parse_mesh(args.mesh)
        batch = args.batch
        if batch is None:  # one sequence per batch shard
            sizes = resolve_mesh_shape(mesh, len(topology_devices(args.topology)))
            batch = sizes["data"] * sizes["fsdp"] * sizes["expert"] * args.grad_accum
        request = CompileRequest(
            preset=args.preset,
            topology=args.topology,
            mesh=mesh,
            batch=batch,
            seq_len=args.seq_len,
            grad_accum=args.grad_accum,
            remat=args.remat,
            hbm_gib=args.hbm_gib,
            overrides=tuple(args.overrides),
            layers=args.layers,
        )
        report = compile_train_step(request)
    except ValueError as err:
        return fail(NAME, err)
    print(format_report(report), flush=True)
    if args.json:
        write_json(args.json, report)
    return 0 if report["status"] == "fits" else 1
