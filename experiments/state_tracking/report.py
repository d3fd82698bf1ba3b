"""The comparison's summary: runs aggregated over seeds, written as ``compare.json`` and ``compare.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments.state_tracking.models import MODELS, model_label
from experiments.state_tracking.recipes import Recipe
from m2rnn_jax.data.atomic import atomic_file

KINDS = {
    "position": "accuracy at position n (the running product after n elements)",
    "sequence": "whole-sequence accuracy (every running product up to n right)",
}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def _model_order(name: str) -> int:
    return list(MODELS).index(name) if name in MODELS else len(MODELS)


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {model: summary}}``: seeds, steps, parameters, state size, seconds and, per table length, the mean,
    min and max over seeds of both accuracies."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    keyed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        keyed.setdefault((result["group"], result["model"]), []).append(result)
    for (group, model), runs in sorted(keyed.items(), key=lambda item: (item[0][0], _model_order(item[0][1]))):
        lengths = sorted(set.intersection(*(set(run["at_lengths"]) for run in runs)), key=int)
        summary.setdefault(group, {})[model] = {
            "label": model_label(model),
            "seeds": sorted(run["seed"] for run in runs),
            "steps": runs[0]["steps"],
            "steps_done": min(run["steps_done"] for run in runs),
            "train_length": runs[0]["train_length"],
            "params": runs[0]["params"],
            "recurrent_state_per_layer": runs[0]["recurrent_state_per_layer"],
            "seconds_per_run": float(np.mean([run["seconds"] for run in runs])),
            "at_lengths": {
                n: {kind: _stats([run["at_lengths"][n][kind] for run in runs]) for kind in KINDS} for n in lengths
            },
        }
    return summary


def markdown(summary: dict[str, dict[str, dict[str, Any]]], budget: str) -> str:
    """Two tables per group (position and whole-sequence accuracy): mean over seeds, the worst seed in brackets."""
    lines = ["# State tracking: every mixer, one budget", "", f"Budget of every run: {budget}.", ""]
    for group, models in summary.items():
        train_length = next(iter(models.values()))["train_length"]
        lengths = sorted({n for entry in models.values() for n in entry["at_lengths"]}, key=int)
        for kind, description in KINDS.items():
            lines += [
                f"## {group.upper()}, trained at length {train_length}: {description}",
                "",
                "Mean over seeds (worst seed).",
                "",
                "| model | params | state / layer | "
                + " | ".join(f"@{n}" for n in lengths)
                + " | seeds | steps | s / run |",
                "|---|---|---|" + "---|" * len(lengths) + "---|---|---|",
            ]
            for entry in models.values():
                cells = []
                for n in lengths:
                    stats = entry["at_lengths"].get(n, {}).get(kind)
                    cells.append("-" if stats is None else f"{100 * stats['mean']:.1f} ({100 * stats['min']:.1f})")
                steps = f"{entry['steps_done']}" + (
                    "" if entry["steps_done"] >= entry["steps"] else f" of {entry['steps']}"
                )
                state = entry["recurrent_state_per_layer"] or "KV cache"
                lines.append(
                    f"| {entry['label']} | {entry['params']:,} | {state} | "
                    + " | ".join(cells)
                    + f" | {len(entry['seeds'])} | {steps} | {entry['seconds_per_run']:.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def write_report(results: list[dict[str, Any]], recipe: Recipe, out: Path) -> list[Path]:
    """Writes ``out/compare.json`` (recipe, summary, every run with its curves) and ``out/compare.md``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(results)
    budget = recipe.describe()
    runs = [{key: value for key, value in result.items() if key != "config"} for result in results]
    payload = {"budget": budget, "summary": summary, "runs": runs}
    json_path, md_path = out / "compare.json", out / "compare.md"
    with atomic_file(json_path) as temporary:
        temporary.write_text(json.dumps(payload) + "\n")
    with atomic_file(md_path) as temporary:
        temporary.write_text(markdown(summary, budget))
    return [json_path, md_path]
