"""Run state-tracking presets over groups and seeds and summarize length generalization.

    python -m experiments.state_tracking --groups s3 a5 --seeds 0 1 2 --out runs/state_tracking
    python -m experiments.state_tracking --size small --groups a5 --seeds 0 --out runs/st_gpu   # on a GPU

Each (group, seed) is one ``m2rnn-jax train --preset state-tracking-<group>-<size>`` run in ``<out>/<group>-s<seed>``
(re-running resumes / skips finished runs). Prints a markdown table of accuracy per eval length and writes
``<out>/summary.json``. ``--set`` overrides apply to every run. A run stopped early (SIGTERM, e.g. from
``timeout``) is evaluated at the step it reached (the table's ``steps`` column says so) and resumes next time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.train.evaluation import write_report
from m2rnn_jax.train.overrides import apply_overrides
from m2rnn_jax.train.presets import train_config
from m2rnn_jax.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.state_tracking",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--groups", nargs="+", default=["s3"], choices=["parity", "s3", "s5", "a5"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--size", default="tiny", help="preset size: state-tracking-<group>-<size> (tiny, small, ...)")
    parser.add_argument("--out", default="runs/state_tracking")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    rows = []
    for group in args.groups:
        for seed in args.seeds:
            config = apply_overrides(
                train_config(f"state-tracking-{group}-{args.size}"),
                [f"seed={seed}", f"data.seed={seed}", *args.overrides],
            )
            workdir = Path(args.out) / f"{group}-s{seed}"
            report = workdir / "length_generalization.json"
            started = time.perf_counter()
            if not report.is_file() or json.loads(report.read_text())["step"] < config.steps:
                trainer = Trainer(config, workdir)
                trainer.run()
                if trainer.step < config.steps:  # stopped by a signal: evaluate the step it reached
                    results = trainer.evaluator.evaluate(trainer.state.params)
                    write_report(
                        results,
                        config.data.seq_len,
                        workdir,
                        f"{group.upper()} (stopped early)",
                        {"step": trainer.step},
                    )
            reported = json.loads(report.read_text())
            results = reported["results"]
            rows.append(
                {
                    "group": group,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - started, 1),
                    "steps": f"{reported['step']}/{config.steps}",
                    "accuracy": {n: r["accuracy"] for n, r in results.items()},
                    "final_accuracy": {n: r["final_accuracy"] for n, r in results.items()},
                }
            )

    lengths = sorted({int(n) for row in rows for n in row["accuracy"]})
    print("| group | seed | " + " | ".join(f"acc @{n}" for n in lengths) + " | steps | seconds |")
    print("|---|---|" + "---|" * len(lengths) + "---|---|")
    for row in rows:
        cells = " | ".join(f"{100 * row['accuracy'][str(n)]:.2f}%" for n in lengths)
        print(f"| {row['group']} | {row['seed']} | {cells} | {row['steps']} | {row['seconds']} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(args.out) / "summary.json") as temporary:
        temporary.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
