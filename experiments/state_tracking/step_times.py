"""Each state-tracking model's train step timed alone: the measured costs of the H200 plan (``h200.sh``, COSTS=).

    python -m experiments.state_tracking.step_times --recipe gpu --json runs/st_step_times.json
    python -m experiments.state_tracking.step_times --models m2rnn gru --lengths 32 128
    python -m experiments.state_tracking.step_times --recipe cpu --train-length 4 --hidden-size 8 --num-layers 1 \\
        --batch-size 2 --iters 1 --repeats 1        (seconds on a CPU)

For every model of the comparison (:mod:`experiments.state_tracking.models`) and every length (default: the
recipe's curriculum lengths), the trainer's jitted, donated train step with the comparison's optimizer (the recipe's
AdamW, schedule over its steps), batch size and dtype (:func:`experiments.state_tracking.recipes.train_config`) is
compiled and then timed after a warm-up call: the median over ``--repeats`` batches of ``--iters`` steps, random
(B, S) tokens of the group (:mod:`m2rnn_jax.bench.model`, :mod:`m2rnn_jax.bench.timing`). The table gives ms per
step and compile seconds; below it, each model's estimated GPU seconds of one full recipe run: the steps the
curriculum spends at each length times that length's ms per step (compiles not included: they run on the host).
``--json`` writes, atomically and again after every measurement (a run cut by a time limit keeps what it did)::

    {"device", "platform", "jax", "recipe" (its name), "budget" (its description), "group", "batch_size",
     "hidden_size", "num_layers", "dtype", "steps", "curriculum": [[first step, length], ...],
     "timing": {"iters", "repeats"},
     "rows": [{"model", "length", "steps", "ms_per_step", "compile_s"} or {..., "error"}, ...],
     "runs": {model: {"seconds": estimated GPU seconds or null, "compile_s": sum over its lengths}}}

``runs[model].seconds`` is null when a curriculum length was not measured or failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax

from experiments.state_tracking.models import MODELS
from experiments.state_tracking.recipes import RECIPES, Recipe, train_config
from m2rnn_jax.bench.model import SEED, Timing, random_batch, time_carried, train_step_function
from m2rnn_jax.bench.report import format_table, write_json
from m2rnn_jax.bench.timing import compile_timed
from m2rnn_jax.data.state_tracking import GROUPS
from m2rnn_jax.train.config import TrainConfig
from m2rnn_jax.train.state import init_train_state


def steps_at_lengths(recipe: Recipe) -> dict[int, int]:
    """Length -> number of training steps the recipe's curriculum spends at that length (summing to its steps)."""
    stages = recipe.curriculum_steps()
    ends = [start for start, _ in stages[1:]] + [recipe.steps]
    steps: dict[int, int] = {}
    for (start, length), end in zip(stages, ends):
        steps[length] = steps.get(length, 0) + end - start
    return steps


def time_train_step(config: TrainConfig, length: int, timing: Timing) -> dict[str, float]:
    """``ms_per_step`` and ``compile_s`` of ``config``'s train step at (batch_size, ``length``) on one device."""
    step, optimizer = train_step_function(config.model, config.optimizer, config.steps)
    state = jax.jit(lambda: init_train_state(config.model, optimizer, SEED))()
    tokens = random_batch(config.model, config.batch_size, length)
    compiled = compile_timed(step, state, tokens)
    ms, _ = time_carried(compiled.executable, state, tokens, timing=timing)
    return {"ms_per_step": ms, "compile_s": compiled.compile_s}


def run_estimates(rows: list[dict[str, Any]], recipe: Recipe, models: list[str]) -> dict[str, dict[str, Any]]:
    """Model -> ``seconds`` (the curriculum's steps at each length x its ms per step; None when a length of the
    curriculum has no measurement) and ``compile_s`` (summed over the model's measured lengths)."""
    steps = steps_at_lengths(recipe)
    runs = {}
    for model in models:
        measured = {row["length"]: row for row in rows if row["model"] == model and "error" not in row}
        seconds = None
        if all(length in measured for length in steps):
            seconds = sum(count * measured[length]["ms_per_step"] / 1e3 for length, count in steps.items())
        runs[model] = {"seconds": seconds, "compile_s": sum(row["compile_s"] for row in measured.values())}
    return runs


def report(
    name: str, recipe: Recipe, group: str, timing: Timing, models: list[str], rows: list[dict[str, Any]]
) -> dict:
    """The JSON report (module docstring) of the rows measured so far; ``name`` is the recipe's name in
    :data:`~experiments.state_tracking.recipes.RECIPES`."""
    device = jax.devices()[0]
    return {
        "device": str(device.device_kind),
        "platform": device.platform,
        "jax": jax.__version__,
        "recipe": name,
        "budget": recipe.describe(),
        "group": group,
        "batch_size": recipe.batch_size,
        "hidden_size": recipe.size.hidden_size,
        "num_layers": recipe.size.num_layers,
        "dtype": recipe.size.dtype,
        "steps": recipe.steps,
        "curriculum": [list(stage) for stage in recipe.curriculum_steps()],
        "timing": dataclasses.asdict(timing),
        "rows": rows,
        "runs": run_estimates(rows, recipe, models),
    }


def format_times(result: dict) -> str:
    """The report as a table (model, length, steps there, ms/step, compile s) and one estimate line per model."""
    columns = (
        ("model", "model", "{}"),
        ("length", "length", "{}"),
        ("steps", "steps", "{}"),
        ("ms/step", "ms_per_step", "{:.3f}"),
        ("compile s", "compile_s", "{:.1f}"),
        ("note", "note", "{}"),
    )
    shown = [{**row, "note": "ERROR" if "error" in row else ""} for row in result["rows"]]
    lines = [
        f"{result['group']} on {result['device']} (jax {result['jax']}), recipe {result['recipe']}: {result['budget']}",
        format_table(columns, shown),
        "estimated GPU seconds of one run (steps at each curriculum length x ms/step; compiles not included):",
    ]
    for model, run in result["runs"].items():
        seconds = "n/a (a curriculum length not measured)" if run["seconds"] is None else f"{run['seconds']:.1f} s"
        lines.append(f"  {model}: {seconds}, compiles {run['compile_s']:.1f} s")
    lines += [f"{row['model']} at {row['length']}: {row['error'][:500]}" for row in result["rows"] if "error" in row]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.state_tracking.step_times",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default="gpu", choices=sorted(RECIPES), help="the training budget (default gpu)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--group", default="s3", choices=list(GROUPS))
    parser.add_argument("--lengths", nargs="+", type=int, help="lengths to time (default: the curriculum's)")
    parser.add_argument("--train-length", type=int, help="training length (the curriculum scales with it)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--iters", type=int, default=Timing.iters, help="steps per timed batch")
    parser.add_argument("--repeats", type=int, default=Timing.repeats, help="timed batches (the median is kept)")
    parser.add_argument("--json", type=Path, help="write the report here (atomically, after every measurement)")
    args = parser.parse_args(argv)
    for name in ("train_length", "batch_size", "hidden_size", "num_layers", "iters", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    if args.lengths and min(args.lengths) < 1:
        parser.error(f"--lengths: expected positive lengths, got {args.lengths}")
    return args


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The named recipe with the size, batch and training length the arguments replace."""
    recipe = RECIPES[args.recipe]
    size_changes = {"hidden_size": args.hidden_size, "num_layers": args.num_layers}
    size = dataclasses.replace(recipe.size, **{k: v for k, v in size_changes.items() if v is not None})
    recipe = dataclasses.replace(recipe, size=size, batch_size=args.batch_size or recipe.batch_size)
    return recipe.with_train_length(args.train_length) if args.train_length else recipe


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    timing = Timing(iters=args.iters, repeats=args.repeats)
    lengths = sorted(set(args.lengths or steps_at_lengths(recipe)))
    steps = steps_at_lengths(recipe)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        config = train_config(recipe, model, args.group, seed=SEED)
        for length in lengths:
            row: dict[str, Any] = {"model": model, "length": length, "steps": steps.get(length, 0)}
            try:
                row.update(time_train_step(config, length, timing))
            except jax.errors.JaxRuntimeError as err:  # one model out of memory must not lose the others
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.json:
                write_json(args.json, report(args.recipe, recipe, args.group, timing, args.models, rows))
    result = report(args.recipe, recipe, args.group, timing, args.models, rows)
    print(format_times(result))
    if args.json:
        print(f"[step_times] wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
