"""The comparison's figure, like the paper's: accuracy vs sequence length per model, the training length marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.state_tracking.models import MODELS, model_label
from m2rnn_jax.data.atomic import atomic_file

PANELS = (("position", "accuracy at length n (%)"), ("sequence", "whole-sequence accuracy (%)"))


def plot_group(results: list[dict[str, Any]], group: str, path: Path) -> Path:
    """Two panels (position and whole-sequence accuracy vs n): per model the mean over seeds, the band from the
    worst to the best seed, a dotted line at the training length. Writes ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_model.setdefault(result["model"], []).append(result)
    order = sorted(by_model, key=lambda name: list(MODELS).index(name) if name in MODELS else len(MODELS))
    train_length = results[0]["train_length"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 5), dpi=120)
    for ax, (kind, ylabel) in zip(axes, PANELS):
        for name in order:
            length = min(len(run["curves"][kind]) for run in by_model[name])
            curves = 100 * np.array([run["curves"][kind][:length] for run in by_model[name]])
            x = np.arange(1, length + 1)
            seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
            (line,) = ax.plot(x, curves.mean(axis=0), label=f"{model_label(name)} ({seeds})", lw=1.5)
            if len(curves) > 1:
                ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.axvline(train_length, color="gray", linestyle="--", lw=1, label=f"training length {train_length}")
        ax.set_ylim(-2, 102)
        ax.set_xlim(1, max(len(run["curves"][kind]) for run in results))
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{group.upper()} state tracking, trained at length {train_length}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:
        fig.savefig(temporary, format="png")
    plt.close(fig)
    return path
