"""Every sequence mixer on a group word problem with one training budget: the paper's S3 figure, and A5 / S5.

    python -m experiments.state_tracking compare --recipe gpu --groups s3 --seeds 0 1 2 --out runs/st_compare
    python -m experiments.state_tracking compare --recipe cpu --groups s3 --seeds 0 --out runs/st_compare_cpu
    python -m experiments.state_tracking compare --recipe gpu --groups a5 --models m2rnn gru --steps 2000

Each (group, model, seed) trains in ``<out>/runs/<group>/<model>/s<seed>`` with the recipe's budget
(:mod:`experiments.state_tracking.recipes`), then its accuracy at every position 1 .. max(lengths) is measured on a
fixed evaluation set (:mod:`experiments.state_tracking.positions`) and written to ``result.json`` there. A finished
run with the same configuration is not trained again; a run stopped by ``--run-seconds``, by its share of
``--deadline-seconds`` (the time left shared among the runs left, :func:`run_budget`) or by SIGTERM is recorded with
the steps it did (``complete: false``) and resumes from its checkpoint next time. At the end ``<out>/compare.json``,
``<out>/compare.md`` and ``<out>/compare_<group>.png`` summarise every run found (``--report-only``: only that).

``--stack-seeds`` trains the seeds of each (group, model) together as ONE program, vmapped over a leading seed axis
on one device (:mod:`experiments.state_tracking.stacked`: each seed's state, data and curriculum as its one-by-one
run has them; losses and parameters agree to float32 rounding, which long runs amplify as they would any change of
summation order), then evaluates and writes every seed as above
(``result.json`` also lists ``stacked_seeds``). Finished seeds are not trained again; in the deadline's sharing a
model's stack counts as its seeds' runs; a stopped stack is checkpointed in ``<out>/runs/<group>/<model>/stack`` and
resumed by the next call with the same seeds. The default trains one seed after another.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.state_tracking.models import MODELS
from experiments.state_tracking.plot import plot_group
from experiments.state_tracking.positions import evaluate_positions
from experiments.state_tracking.recipes import RECIPES, Recipe, train_config
from experiments.state_tracking.report import write_report
from experiments.state_tracking.run_files import cached_result, prepare_run_directory, run_directory, write_result
from experiments.state_tracking.stacked import pending_seeds, run_stacked
from m2rnn_jax.data.state_tracking import GROUPS
from m2rnn_jax.train.trainer import Trainer


class _StopRequests:
    """SIGTERM / SIGINT outside a training run, and the per-run time budget.

    While :meth:`Trainer.run` trains, its own handler turns a signal into "save and return"; outside it this handler
    records the signal, so the current run is finished and written before the comparison stops. A time budget is
    a timer that sends this process SIGTERM: the run stops at its next step, is evaluated, and the next one starts.
    """

    def __init__(self):
        self.received = False
        self.budget_expired = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self.budget_expired:  # once the budget is over, SIGTERMs are the budget's own
            self.received = True

    def _expire(self, done: threading.Event) -> None:
        """Sends SIGTERM every second until the run returns (one sent before the trainer installs its handler would
        otherwise be lost)."""
        self.budget_expired = True
        while not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            done.wait(1.0)

    @contextlib.contextmanager
    def budget(self, seconds: float | None):
        """Within the block, SIGTERM arrives after ``seconds`` (None: never)."""
        self.budget_expired = False
        done = threading.Event()
        timer = None if seconds is None else threading.Timer(seconds, self._expire, (done,))
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            done.set()
            if timer is not None:
                timer.cancel()
                timer.join()

    def checker(self, seconds: float | None) -> Callable[[], bool]:
        """For training without a :class:`Trainer` (:func:`run_stacked`, whose loop asks after every step): a
        function that is True once a signal arrived or ``seconds`` (None: never) have passed from now."""
        end = None if seconds is None else time.monotonic() + seconds
        return lambda: self.received or (end is not None and time.monotonic() >= end)

    def stop_requested(self, trainer_step: int, steps: int) -> bool:
        """True when a signal from outside stopped the run (not its time budget) or arrived after it."""
        return self.received or (trainer_step < steps and not self.budget_expired)


class _ComparisonTrainer(Trainer):
    """A :class:`Trainer` without its final report: the comparison measures every position itself
    (:func:`evaluate_positions`), so the trainer's evaluation at the training length would only add a compile."""

    def final_report(self) -> dict[int, dict[str, float]]:
        return {}


# Seconds kept for each run's evaluation and result when a deadline shares the time out (its first evaluation
# compiles the forward at the longest length).
EVALUATION_SECONDS = 20.0
# A run whose share of the time left is shorter than this is not started (its compile alone would not fit).
SHORTEST_RUN_SECONDS = 10.0


def run_budget(seconds_left: float | None, runs_left: int, run_seconds: float | None, seeds: int = 1) -> float | None:
    """Training seconds for the next of ``runs_left`` runs: an equal share of ``seconds_left`` (the time before
    the deadline; None: no deadline) less :data:`EVALUATION_SECONDS`, capped at ``run_seconds``. None: no limit.

    The share is taken again before every run, so time a run did not use (a finished or cached run, a faster
    compile) goes to the runs after it. When the time left cannot give every run :data:`SHORTEST_RUN_SECONDS`, it
    is shared among as many runs as it can (the last ones are skipped); 0 means: no time for this run, skip it.
    ``seeds``: the next run trains that many seeds as one program (``--stack-seeds``) and counts as that many runs
    of ``runs_left``: it gets their shares less one evaluation per seed (when fewer than ``seeds`` runs fit: all the
    time left less the evaluations, 0 if that is under :data:`SHORTEST_RUN_SECONDS`), capped at ``run_seconds``."""
    if seeds < 1 or runs_left < seeds:
        raise ValueError(f"runs_left: expected >= seeds >= 1, got runs_left={runs_left}, seeds={seeds}")
    if seconds_left is None:
        return run_seconds
    runs_that_fit = min(runs_left, int(seconds_left // (SHORTEST_RUN_SECONDS + EVALUATION_SECONDS)))
    if runs_that_fit < 1:
        return 0.0
    share = seconds_left * min(seeds, runs_that_fit) / runs_that_fit - seeds * EVALUATION_SECONDS
    if share < SHORTEST_RUN_SECONDS:
        return 0.0
    return share if run_seconds is None else min(share, run_seconds)


def run_one(
    recipe: Recipe, model: str, group: str, seed: int, out: Path, stops: _StopRequests, run_seconds: float | None = None
) -> dict[str, Any]:
    """Trains (or resumes) one run, evaluates it at every position, writes and returns its ``result.json``.

    ``run_seconds``: stop training after that long (the run is recorded with the steps it did)."""
    config = train_config(recipe, model, group, seed)
    directory = run_directory(out, group, model, seed)
    cached = cached_result(directory, config)
    if cached is not None:
        return cached
    prepare_run_directory(directory, config)

    started = time.perf_counter()
    trainer = _ComparisonTrainer(config, directory)
    with stops.budget(run_seconds):
        trainer.run()
    train_seconds = time.perf_counter() - started
    curves = evaluate_positions(trainer, group, max(recipe.lengths), recipe.eval_sequences)
    return write_result(
        directory,
        recipe,
        model,
        group,
        config,
        steps_done=trainer.step,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - started,
        curves=curves,
    )


def collect(out: Path, groups: list[str], models: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``out`` for the given groups, models and seeds (missing runs are skipped)."""
    results = []
    for group in groups:
        for model in models:
            for seed in seeds:
                path = run_directory(out, group, model, seed) / "result.json"
                if path.is_file():
                    results.append(json.loads(path.read_text()))
    return results


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = RECIPES[args.recipe]
    size = dataclasses.replace(
        recipe.size, **{k: v for k, v in (("hidden_size", args.hidden_size), ("num_layers", args.num_layers)) if v}
    )
    changes: dict[str, Any] = {"size": size}
    if args.steps:
        changes["steps"] = args.steps
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.learning_rate:
        changes["learning_rate"] = args.learning_rate
    if args.lengths:
        changes["lengths"] = tuple(sorted(args.lengths))
    if args.eval_sequences:
        changes["eval_sequences"] = args.eval_sequences
    recipe = dataclasses.replace(recipe, **changes)
    return recipe.with_train_length(args.train_length) if args.train_length else recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.state_tracking compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default="gpu", choices=sorted(RECIPES), help="the training budget (default gpu)")
    parser.add_argument("--groups", nargs="+", default=["s3"], choices=list(GROUPS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lengths", nargs="+", type=int, help="table lengths (default: the recipe's)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the recipe's)")
    parser.add_argument("--train-length", type=int, help="training length (the curriculum scales with it)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float, help="peak AdamW learning rate (default: the recipe's)")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--eval-sequences", type=int)
    parser.add_argument("--run-seconds", type=float, help="stop training a run after this long (then evaluate)")
    parser.add_argument(
        "--deadline-seconds",
        type=float,
        help="finish every run (training, evaluation, result) within this many seconds of the start: each run "
        "trains for its equal share of the time left (at most --run-seconds); runs that would get less than "
        f"{SHORTEST_RUN_SECONDS:g} s are skipped",
    )
    parser.add_argument(
        "--stack-seeds",
        action="store_true",
        help="train the seeds of each model together as one program (vmapped over a leading seed axis, one device) "
        "instead of one after another",
    )
    parser.add_argument("--out", default="runs/state_tracking_compare")
    parser.add_argument("--report-only", action="store_true", help="summarise the runs under --out, train nothing")
    args = parser.parse_args(argv)
    for name in ("run_seconds", "deadline_seconds", "learning_rate"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    for name in ("steps", "train_length", "batch_size", "hidden_size", "num_layers", "eval_sequences"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    if args.stack_seeds and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: expected each seed once with --stack-seeds, got {args.seeds}")
    if args.lengths and min(args.lengths) < 1:
        parser.error(f"--lengths: expected positive lengths, got {args.lengths}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = _recipe_from_args(args)
    out = Path(args.out)
    if not args.report_only:
        with _StopRequests() as stops:
            (_train_stacked if args.stack_seeds else _train_one_by_one)(args, recipe, out, stops)
    results = collect(out, args.groups, args.models, args.seeds)
    paths = write_report(results, recipe, out)
    for group in args.groups:
        group_results = [r for r in results if r["group"] == group]
        if group_results:
            paths.append(plot_group(group_results, group, out / f"compare_{group}.png"))
    print((out / "compare.md").read_text())
    print("[compare] wrote " + ", ".join(str(p) for p in paths))
    return 0


def _seconds_left(args: argparse.Namespace, started: float) -> float | None:
    return None if args.deadline_seconds is None else args.deadline_seconds - (time.monotonic() - started)


def _print_result(result: dict[str, Any]) -> None:
    cells = " ".join(f"@{n}={100 * v['position']:.1f}%" for n, v in result["at_lengths"].items())
    print(
        f"[compare] {result['group']} {result['model']} seed {result['seed']}: {result['steps_done']}/"
        f"{result['steps']} steps, {result['seconds']} s, {cells}",
        flush=True,
    )


def _train_one_by_one(args: argparse.Namespace, recipe: Recipe, out: Path, stops: _StopRequests) -> None:
    started = time.monotonic()
    runs = list(itertools.product(args.groups, args.models, args.seeds))
    for index, (group, model, seed) in enumerate(runs):
        seconds_left = _seconds_left(args, started)
        budget = run_budget(seconds_left, len(runs) - index, args.run_seconds)
        if budget == 0:
            print(f"[compare] {group} {model} seed {seed}: skipped, {seconds_left:.0f} s left", flush=True)
            continue
        result = run_one(recipe, model, group, seed, out, stops, budget)
        _print_result(result)
        if stops.stop_requested(result["steps_done"], result["steps"]):
            print("[compare] stopped by a signal: reporting the runs done so far", flush=True)
            return


def _train_stacked(args: argparse.Namespace, recipe: Recipe, out: Path, stops: _StopRequests) -> None:
    """Every (group, model) trains its seeds as one program (:func:`run_stacked`), the seeds without a finished
    result; in the deadline's sharing it counts as that many runs."""
    started = time.monotonic()
    pairs = list(itertools.product(args.groups, args.models))
    for index, (group, model) in enumerate(pairs):
        pending = pending_seeds(recipe, model, group, args.seeds, out)
        seconds_left = _seconds_left(args, started)
        budget = run_budget(seconds_left, (len(pairs) - index) * len(args.seeds), args.run_seconds, len(pending) or 1)
        if pending and budget == 0:
            print(f"[compare] {group} {model} seeds {pending}: skipped, {seconds_left:.0f} s left", flush=True)
            continue
        if pending:
            limit = "" if budget is None else f" for at most {budget:.0f} s"
            print(f"[compare] {group} {model} seeds {pending} stacked: training{limit}", flush=True)
        for result in run_stacked(recipe, model, group, args.seeds, out, stops.checker(budget)):
            _print_result(result)
        if stops.received:
            print("[compare] stopped by a signal: reporting the runs done so far", flush=True)
            return
