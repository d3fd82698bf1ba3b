"""``m2rnn-jax bench``: time the M2RNN op's backends (forward, forward+backward, ns per step, memory).

The benchmark itself lives in :mod:`m2rnn_jax.bench.op` (also runnable as ``python -m m2rnn_jax.bench.op``).
"""

from __future__ import annotations

import argparse
from typing import Any

NAME = "bench"
SHAPE_NAMES = ("400m", "400m-b1", "400m-s16k", "400m-b1-s16k", "7b", "tiny")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(NAME, help="time the M2RNN op backends and print a table (optionally write JSON)")
    p.add_argument("--shapes", nargs="+", default=["400m", "400m-b1", "400m-s16k"], choices=SHAPE_NAMES,
                   help="named problem shapes (default: the paper's 400M layer, B=1, S=16384)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to time (default: pallas_gpu and scan on a GPU, scan elsewhere)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--iters", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.bench import op as kernels

    return kernels.run(args.shapes, args.backends or kernels.default_backends(), args.json, args.iters, args.repeats)
