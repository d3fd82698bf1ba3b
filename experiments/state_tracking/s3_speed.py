"""How fast one model of the comparison learns a group, with config overrides: the S3 learning-speed search.

    python -m experiments.state_tracking.s3_speed --recipe cpu --seeds 0 1 --out /tmp/s3speed/clip_off \\
        --set model.m2rnn.gradient_clipping=null
    python -m experiments.state_tracking.s3_speed --recipe cpu --model gru --seeds 0 1 --out /tmp/s3speed/gru

Each seed trains ``--model`` (default m2rnn) with the comparison's recipe (:func:`recipes.train_config`, every
``--set KEY=VALUE`` applied to that :class:`TrainConfig`, e.g. ``model.m2rnn.num_heads=2``,
``model.initializer_range=0.5``, ``optimizer.learning_rate=1e-2``) in ``<out>/s<seed>``, logging the training
accuracy every ``--log-every`` steps. Then it reads off, per curriculum length, the first logged step whose training
accuracy is >= 99%, and the position accuracy at 1x, 2x and 4x the training length on the comparison's fixed
evaluation set; one markdown row per seed is printed and written to ``<out>/s<seed>/speed.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from experiments.state_tracking.models import MODELS
from experiments.state_tracking.positions import evaluate_positions
from experiments.state_tracking.recipes import RECIPES, Recipe, train_config
from m2rnn_jax.train.overrides import apply_overrides
from m2rnn_jax.train.trainer import Trainer

LEARNED = 0.99  # the training accuracy that counts as learned
EXTRAPOLATION = (1, 2, 4)  # evaluation lengths, as multiples of the training length


class _QuietTrainer(Trainer):
    """A :class:`Trainer` without its final report (the evaluation here reads every position itself)."""

    def final_report(self) -> dict[int, dict[str, float]]:
        return {}


def learned_steps(metrics: Path, lengths: list[int]) -> dict[str, int | None]:
    """Per curriculum length, the first logged step at that length whose training accuracy is >= :data:`LEARNED`
    (None: never)."""
    steps: dict[str, int | None] = {str(n): None for n in lengths}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        length = str(record.get("seq_len"))
        if record.get("kind") == "train" and steps.get(length, 0) is None and record["accuracy"] >= LEARNED:
            steps[length] = int(record["step"])
    return steps


def last_train_accuracy(metrics: Path) -> float:
    """The last logged training accuracy."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in records if r.get("kind") == "train"][-1]["accuracy"]


def run_seed(
    recipe: Recipe, model: str, group: str, seed: int, overrides: list[str], log_every: int, out: Path
) -> dict[str, Any]:
    """Trains one seed in ``out/s<seed>`` and returns (and writes) its ``speed.json``."""
    config = apply_overrides(train_config(recipe, model, group, seed), overrides)
    config = dataclasses.replace(config, log_every=log_every)
    directory = out / f"s{seed}"
    started = time.perf_counter()
    trainer = _QuietTrainer(config, directory)
    trainer.run()
    train_seconds = time.perf_counter() - started
    lengths = [m * recipe.train_length for m in EXTRAPOLATION]
    curves = evaluate_positions(trainer, group, max(lengths), recipe.eval_sequences)
    metrics = directory / "metrics.jsonl"
    result = {
        "model": model,
        "group": group,
        "seed": seed,
        "overrides": overrides,
        "steps": trainer.step,
        "learned_steps": learned_steps(metrics, [length for _, length in recipe.curriculum_steps()]),
        "last_train_accuracy": last_train_accuracy(metrics),
        "position_accuracy": {str(n): curves["position"][n - 1] for n in lengths},
        "train_seconds": round(train_seconds, 1),
    }
    (directory / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def table_row(result: dict[str, Any]) -> str:
    """One markdown row: setting, seed, steps to 99% per curriculum length, last training accuracy, accuracy at
    1x/2x/4x, seconds."""
    learned = " / ".join("-" if step is None else str(step) for step in result["learned_steps"].values())
    cells = " / ".join(f"{100 * v:.1f}" for v in result["position_accuracy"].values())
    setting = " ".join(result["overrides"]) or "default"
    return (
        f"| {result['model']} {setting} | {result['seed']} | {learned} | {100 * result['last_train_accuracy']:.1f}% | "
        f"{cells} | {result['train_seconds']} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.state_tracking.s3_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES))
    parser.add_argument("--model", default="m2rnn", choices=list(MODELS))
    parser.add_argument("--group", default="s3")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's; the curriculum scales)")
    parser.add_argument("--hidden-size", type=int, help="model width (default: the recipe's)")
    parser.add_argument("--log-every", type=int, default=25, help="steps between training-accuracy logs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    if args.steps:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    if args.hidden_size:
        recipe = dataclasses.replace(recipe, size=dataclasses.replace(recipe.size, hidden_size=args.hidden_size))
    rows = [
        table_row(run_seed(recipe, args.model, args.group, seed, args.overrides, args.log_every, Path(args.out)))
        for seed in args.seeds
    ]
    lengths = " / ".join(f"@{m * recipe.train_length}" for m in EXTRAPOLATION)
    stages = " / ".join(f"@{length}" for _, length in recipe.curriculum_steps())
    print(f"| setting | seed | step >= 99% {stages} | last train acc | position acc % {lengths} | train s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
