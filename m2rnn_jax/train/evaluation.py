"""Evaluation over the fixed eval sets at several lengths, and the length-generalization report (table + PNG)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from m2rnn_jax.data.sources import BatchSource
from m2rnn_jax.parallel.batches import global_batch
from m2rnn_jax.parallel.shardings import batch_sharding, batch_shards, replicated
from m2rnn_jax.train.config import DataConfig
from m2rnn_jax.train.step import make_eval_step


class Evaluator:
    """Runs the eval sets of ``data`` at each of ``data.eval_lengths`` (one compiled step per length).

    ``token_bytes`` (vocab,) UTF-8 bytes per token id (default: the source's) adds bits per byte to the results.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        param_shardings: nnx.State,
        mesh: Mesh,
        source: BatchSource,
        data: DataConfig,
        token_bytes: np.ndarray | None = None,
    ):
        shards = batch_shards(mesh)
        if data.eval_batch_size % shards != 0:
            raise ValueError(
                f"data.eval_batch_size: expected a multiple of the {shards} batch shards of the mesh, "
                f"got {data.eval_batch_size}"
            )
        self.mesh, self.source, self.data = mesh, source, data
        self.token_bytes = source.token_bytes if token_bytes is None else token_bytes
        self.sharding = batch_sharding(mesh)
        self._step = jax.jit(
            make_eval_step(graphdef), in_shardings=(param_shardings, self.sharding), out_shardings=replicated(mesh)
        )

    def _target_bytes(self, rows: dict[str, np.ndarray]) -> float:
        """UTF-8 bytes of this process's counted targets (all processes' when there are several)."""
        weights = np.ones(rows["targets"].shape) if "loss_mask" not in rows else rows["loss_mask"] != 0
        local = np.asarray(float(np.sum(self.token_bytes[rows["targets"]] * weights)))
        if jax.process_count() > 1:
            return float(np.sum(multihost_utils.process_allgather(local)))
        return float(local)

    def num_batches(self, length: int) -> int:
        """Eval batches at ``length`` (each ``data.eval_batch_size`` rows)."""
        return self.source.num_eval_batches(length, self.data.eval_batch_size)

    def evaluate(
        self, params: nnx.State, lengths: tuple[int, ...] | None = None, on_batch: Callable[[], None] | None = None
    ) -> dict[int, dict[str, float]]:
        """{length: {"loss", "accuracy", "final_accuracy", "tokens"}} over the source's eval batches; language
        data (every kind but state_tracking) adds "perplexity", and "bits_per_byte" when the tokenizer is known.
        ``on_batch`` is called after each batch (progress reporting)."""
        results = {}
        size = self.data.eval_batch_size
        for length in lengths or self.data.eval_lengths:
            totals: dict[str, float] = {"bytes": 0.0}
            for index in range(self.num_batches(length)):
                local: dict[str, np.ndarray] = {}

                def make_rows(
                    rows: slice, index: int = index, length: int = length, local: dict[str, np.ndarray] = local
                ) -> dict[str, np.ndarray]:
                    local.update(self.source.eval_batch(index, length, size, rows))
                    return local

                batch = global_batch(make_rows, self.sharding, size, length)
                if self.token_bytes is not None:
                    totals["bytes"] += self._target_bytes(local)
                with jax.set_mesh(self.mesh):
                    sums = jax.device_get(self._step(params, batch))
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                if on_batch is not None:
                    on_batch()
            tokens = max(totals["tokens"], 1.0)
            results[length] = {
                "loss": totals["cross_entropy_sum"] / tokens,
                "accuracy": totals["correct"] / tokens,
                "final_accuracy": totals["correct_last"] / max(totals["rows"], 1.0),
                "tokens": int(totals["tokens"]),
            }
            if self.data.kind != "state_tracking":
                results[length]["perplexity"] = math.exp(min(results[length]["loss"], 700.0))
            if self.token_bytes is not None:
                bits = totals["cross_entropy_sum"] / math.log(2)
                results[length]["bits_per_byte"] = bits / max(totals["bytes"], 1.0)
        return results


def format_table(results: dict[int, dict[str, float]], train_length: int) -> str:
    """A text table. State tracking: length, x train length, token accuracy, final-position accuracy, loss.
    Language data: length, loss, perplexity, bits per byte (when known), token accuracy, tokens."""
    if all("perplexity" in r for r in results.values()):
        lines = [f"{'length':>8} {'loss':>10} {'perplexity':>12} {'bits/byte':>10} {'accuracy':>10} {'tokens':>10}"]
        for length in sorted(results):
            r = results[length]
            bpb = f"{r['bits_per_byte']:>10.4f}" if "bits_per_byte" in r else f"{'-':>10}"
            lines.append(
                f"{length:>8} {r['loss']:>10.4f} {r['perplexity']:>12.3f} {bpb} "
                f"{100 * r['accuracy']:>9.2f}% {r['tokens']:>10}"
            )
        return "\n".join(lines)
    lines = [f"{'length':>8} {'x train':>8} {'accuracy':>10} {'final acc':>10} {'loss':>10}"]
    for length in sorted(results):
        r = results[length]
        lines.append(
            f"{length:>8} {length / train_length:>8.1f} {100 * r['accuracy']:>9.2f}% "
            f"{100 * r['final_accuracy']:>9.2f}% {r['loss']:>10.4f}"
        )
    return "\n".join(lines)


def write_report(
    results: dict[int, dict[str, float]],
    train_length: int,
    directory: str | Path,
    title: str,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes ``length_generalization.json`` and ``length_generalization.png`` (accuracy vs length) to
    ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / "length_generalization.json", directory / "length_generalization.png"
    payload = {
        "title": title,
        "train_length": train_length,
        "results": {str(k): v for k, v in sorted(results.items())},
        **(extra or {}),
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")

    lengths = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(lengths, [100 * results[n]["accuracy"] for n in lengths], "o-", label="all positions")
    ax.plot(lengths, [100 * results[n]["final_accuracy"] for n in lengths], "s--", label="last position")
    ax.axvline(train_length, color="gray", linestyle=":", label=f"train length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(0, 101)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path
