"""``m2rnn-jax eval``: evaluate the latest (or a given) checkpoint of a run at chosen lengths.

Example::

    m2rnn-jax eval --workdir runs/s3 --lengths 64 256 1024 4096

The run's ``config.json`` is used unless ``--preset`` / ``--config`` are given; ``--set`` overrides apply either
way (e.g. ``--set mesh.data=1`` to evaluate on another mesh). For state-tracking runs the table and the
``length_generalization.{json,png}`` report are written to ``--output`` (default: the workdir).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NAME = "eval"


def add_parser(subparsers: Any) -> None:
    from m2rnn_jax.commands.train import add_config_arguments
    from m2rnn_jax.parallel.distributed import add_distributed_arguments

    p = subparsers.add_parser(NAME, help="evaluate a run's checkpoint at several sequence lengths")
    p.add_argument("--workdir", required=True, help="run directory written by m2rnn-jax train")
    add_config_arguments(p)
    p.add_argument("--lengths", type=int, nargs="+", help="eval lengths (default: data.eval_lengths)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--output", help="where to write the report (default: --workdir)")
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.commands.train import resolve_config
    from m2rnn_jax.parallel.distributed import initialize_distributed

    workdir = Path(args.workdir)
    try:
        initialize_distributed(args)
        saved = workdir / "config.json"
        config = resolve_config(args, json.loads(saved.read_text()) if saved.is_file() else None)
        if args.lengths:
            from m2rnn_jax.train.overrides import merge

            config = merge(config, {"data": {"eval_lengths": list(args.lengths)}})
        from m2rnn_jax.train.evaluation import format_table, write_report
        from m2rnn_jax.train.restore import restore_params

        restored = restore_params(config, workdir / "checkpoints", args.step)
    except ValueError as err:
        print(f"m2rnn-jax eval: error: {err}", file=sys.stderr)
        return 2
    from m2rnn_jax.data.sources import make_source
    from m2rnn_jax.train.evaluation import Evaluator

    source = make_source(config.data, config.model.vocab_size)
    evaluator = Evaluator(restored.graphdef, restored.param_shardings, restored.mesh, source, config.data)
    results = evaluator.evaluate(restored.params)
    step = restored.step
    print(f"checkpoint step {step}")
    print(format_table(results, config.data.seq_len))
    if config.data.kind == "state_tracking":
        title = f"{config.data.group.upper()} state tracking, trained at length {config.data.seq_len} ({step} steps)"
        json_path, png_path = write_report(results, config.data.seq_len, args.output or workdir, title,
                                           {"step": step})
        print(f"wrote {json_path} and {png_path}")
    return 0

