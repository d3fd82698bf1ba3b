"""The files of one comparison run, ``<out>/runs/<group>/<model>/s<seed>``: where it lives, whether it is finished,
and its ``result.json`` (written alike by one-by-one and stacked training, read by ``collect``, report and plot)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from experiments.state_tracking.positions import at_lengths
from experiments.state_tracking.recipes import Recipe
from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.models.counting import model_summary
from m2rnn_jax.train.config import TrainConfig


def run_directory(out: Path, group: str, model: str, seed: int) -> Path:
    return out / "runs" / group / model / f"s{seed}"


def _result_of(directory: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The result in ``directory`` (finished or not) if it was trained with ``config``."""
    path = directory / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("config") == config.to_dict() else None


def cached_result(directory: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The finished result in ``directory`` if it was trained with ``config``."""
    result = _result_of(directory, config)
    return result if result is not None and result.get("complete") else None


def _unfinished_result(directory: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The unfinished result in ``directory`` if it was trained with ``config`` (what a resumed run continues)."""
    result = _result_of(directory, config)
    return None if result is None or result.get("complete") else result


def prepare_run_directory(directory: Path, config: TrainConfig) -> None:
    """Creates ``directory``; one holding the result of another configuration is emptied first (start again)."""
    path = directory / "result.json"
    if path.is_file() and json.loads(path.read_text()).get("config") != config.to_dict():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)


def write_result(
    directory: Path,
    recipe: Recipe,
    model: str,
    group: str,
    config: TrainConfig,
    *,
    steps_done: int,
    train_seconds: float,
    seconds: float,
    curves: dict[str, list[float]],
    **extra: Any,
) -> dict[str, Any]:
    """Writes and returns the run's ``result.json`` (``extra``: more fields, e.g. ``stacked_seeds``); a complete
    run's ``checkpoints/`` is removed.

    ``train_seconds`` and ``seconds`` are this sitting's; a run resumed from an unfinished result of the same
    configuration adds that result's, so that the file holds the run's whole time (``sittings`` counts them)."""
    summary = model_summary(config.model)
    earlier = _unfinished_result(directory, config)
    if earlier is not None:
        train_seconds += earlier["train_seconds"]
        seconds += earlier["seconds"]
    result = {
        "group": group,
        "model": model,
        "seed": config.seed,
        "steps": config.steps,
        "steps_done": steps_done,
        "complete": steps_done >= config.steps,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(seconds, 1),
        "sittings": 1 if earlier is None else earlier.get("sittings", 1) + 1,
        "train_length": recipe.train_length,
        "params": summary["params_total"],
        "recurrent_state_per_layer": sum(summary["recurrent_state_per_layer"].values()),
        "at_lengths": at_lengths(curves, list(recipe.lengths)),
        "curves": curves,
        "config": config.to_dict(),
        **extra,
    }
    with atomic_file(directory / "result.json") as temporary:
        temporary.write_text(json.dumps(result) + "\n")
    if result["complete"]:
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    return result
