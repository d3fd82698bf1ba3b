"""The multi-GPU run's data and summary.

    python -m experiments.multi_gpu.compare make-data --out tokens.bin --vocab-size 100352 --tokens 1000000
    python -m experiments.multi_gpu.compare summarize --rows OUT/rows --op OUT/op.json --tolerance 2e-3 \\
        --out OUT/summary

``make-data``: a learnable token stream written here, so that nothing is downloaded: a first-order Markov chain
over ``vocab_size`` ids in which every id has 4 equally likely successors (entropy 2 bits per token; the
loss falls from ~ln V towards ln 4 = 1.39 as the model learns the table). uint32, written atomically.

``summarize``: every training row (``train_run``'s ``<label>.p<i>.json``; the processes of one run merged: peak
memory per device in process order) against its reference: ``ref`` for the runs at ``ref``'s sequence length,
``ref_long`` for the others. ``loss_diff`` = loss - reference loss; ``ok`` when ``|loss_diff| <= tolerance * |reference
loss|``; ``dist`` (one process per GPU) is also compared with ``data`` (``same_run_loss_diff``,
``same_run_speed_ratio``: its tokens/s over data's). The M2RNN op rows (``op_parallel``) are added as they are.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from m2rnn_jax.data.atomic import atomic_file

SUCCESSORS = 4
REFERENCES = ("ref", "ref_long")
ORDER = ("ref", "ref_long", "data", "data_tensor", "fsdp", "context", "dist")  # the summary's row order
SAME_RUN = {"dist": "data"}  # run -> the same run in another process layout (one process for all GPUs)


def markov_tokens(num_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """(num_tokens,) uint32: a Markov chain with ``SUCCESSORS`` uniformly chosen successors per id."""
    if vocab_size < SUCCESSORS:
        raise ValueError(f"vocab_size: expected >= {SUCCESSORS}, got {vocab_size}")
    if num_tokens < 2:
        raise ValueError(f"num_tokens: expected >= 2, got {num_tokens}")
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab_size, size=(vocab_size, SUCCESSORS)).tolist()
    choices = rng.integers(0, SUCCESSORS, size=num_tokens).tolist()
    tokens = [int(rng.integers(0, vocab_size))]
    for choice in choices[1:]:  # sequential by nature: Python lists, ~1 s per million tokens
        tokens.append(table[tokens[-1]][choice])
    return np.asarray(tokens, np.uint32)


def merge_rows(rows_dir: Path) -> dict[str, dict[str, Any]]:
    """label -> the run's row (process 0's values, ``peak_gib`` of every process's devices in process order)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(rows_dir.glob("*.p*.json")):
        row = json.loads(path.read_text())
        by_label.setdefault(row["label"], []).append(row)
    merged = {}
    rank = {label: index for index, label in enumerate(ORDER)}
    for label, rows in sorted(by_label.items(), key=lambda item: (rank.get(item[0], len(ORDER)), item[0])):
        rows.sort(key=lambda row: row["process_index"])
        main = dict(rows[0])
        main["peak_gib"] = [peak for row in rows for peak in row["peak_gib"]]
        main["processes_reported"] = len(rows)
        merged[label] = main
    return merged


def compare_runs(runs: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """The runs in their order with ``reference``, ``loss_diff``, ``grad_norm_diff`` and ``ok`` filled in."""
    lengths = {runs[name]["seq_len"]: name for name in REFERENCES if name in runs}
    table = []
    for label, row in runs.items():
        row = dict(row)
        reference = runs.get(lengths.get(row["seq_len"], ""))
        if reference is not None and label != reference["label"] and row.get("loss") is not None:
            row["reference"] = reference["label"]
            row["loss_diff"] = row["loss"] - reference["loss"]
            row["grad_norm_diff"] = row["grad_norm"] - reference["grad_norm"]
            row["ok"] = abs(row["loss_diff"]) <= tolerance * abs(reference["loss"])
        same = runs.get(SAME_RUN.get(label, ""))
        if same is not None and row.get("loss") is not None:
            row["same_run"] = same["label"]
            row["same_run_loss_diff"] = row["loss"] - same["loss"]
            if row.get("tokens_per_second") and same.get("tokens_per_second"):
                row["same_run_speed_ratio"] = row["tokens_per_second"] / same["tokens_per_second"]
        table.append(row)
    return table


def _number(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _mesh(mesh: dict[str, int]) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in mesh.items() if size != 1) or "1 device"


def markdown(table: list[dict[str, Any]], op: dict[str, Any] | None, tolerance: float) -> str:
    """The summary as Markdown tables."""
    lines = [
        f"Training (loss of step N; ok = |loss - reference| <= {tolerance:g} x reference loss)",
        "",
        "| run | mesh | processes | S | batch | step ms | tokens/s | MFU | peak GiB per device | loss | diff | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        peaks = [p for p in row["peak_gib"] if p is not None]
        peak = "/".join(f"{p:.1f}" for p in peaks) if peaks else "n/a"
        mfu = None if row.get("mfu") is None else 100 * row["mfu"]
        lines.append(
            f"| {row['label']} | {_mesh(row['mesh'])} | {row['num_processes']} | {row['seq_len']} | "
            f"{row['batch_size']} | {_number(row.get('step_ms'), '.1f')} | "
            f"{_number(row.get('tokens_per_second'), ',.0f')} | {_number(mfu, '.1f')}{'%' if mfu else ''} | {peak} | "
            f"{_number(row.get('loss'), '.6f')} | {_number(row.get('loss_diff'), '+.2e')} | "
            f"{'' if 'ok' not in row else ('yes' if row['ok'] else 'NO')} |"
        )
    for row in table:
        if "same_run" in row:
            ratio = row.get("same_run_speed_ratio")
            lines += [
                "",
                f"{row['label']} ({row['num_processes']} processes) against {row['same_run']} (1 process): loss diff "
                f"{row['same_run_loss_diff']:+.2e}" + ("" if ratio is None else f", tokens/s ratio {ratio:.3f}"),
            ]
    if op is not None:
        lines += [
            "",
            f"M2RNN op ({op['device']}; speed-up = one device's ms / the layout's ms)",
            "",
            "| layout | mesh | shape | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | max rel. diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in op["rows"]:
            if "error" in row:
                lines.append(f"| {row['layout']} | {row.get('mesh')} | ERROR: {row['error'][:200]} | | | | | |")
                continue
            lines.append(
                f"| {row['layout']} | {_mesh(row['mesh'])} | {row['shape']} | {row['forward_ms']:.3f} | "
                f"{row['fwd_bwd_ms']:.3f} | {_number(row.get('forward_speedup'), '.2f')} | "
                f"{_number(row.get('fwd_bwd_speedup'), '.2f')} | {_number(row.get('max_rel_diff'), '.1e')} |"
            )
    return "\n".join(lines) + "\n"


def summarize(rows_dir: Path, op_path: Path | None, tolerance: float, out: Path) -> dict[str, Any]:
    """Writes ``<out>.json`` and ``<out>.md``; returns the summary."""
    table = compare_runs(merge_rows(rows_dir), tolerance)
    op = json.loads(op_path.read_text()) if op_path is not None and op_path.is_file() else None
    summary = {"tolerance": tolerance, "runs": table, "op": op}
    for suffix, text in ((".json", json.dumps(summary, indent=1) + "\n"), (".md", markdown(table, op, tolerance))):
        with atomic_file(out.with_suffix(suffix)) as temporary:
            temporary.write_text(text)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("make-data", help="write the Markov token file")
    data.add_argument("--out", required=True)
    data.add_argument("--vocab-size", type=int, required=True)
    data.add_argument("--tokens", type=int, default=1_000_000)
    data.add_argument("--seed", type=int, default=0)
    report = commands.add_parser("summarize", help="the rows as summary.json + summary.md")
    report.add_argument("--rows", required=True, help="folder of train_run rows")
    report.add_argument("--op", default=None, help="op_parallel's JSON")
    report.add_argument("--tolerance", type=float, required=True, help="relative loss tolerance")
    report.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    if args.command == "make-data":
        tokens = markov_tokens(args.tokens, args.vocab_size, args.seed)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as temporary:
            tokens.tofile(temporary)
        print(f"wrote {len(tokens):,} tokens (vocab {args.vocab_size}) to {out}")
        return 0
    summary = summarize(Path(args.rows), Path(args.op) if args.op else None, args.tolerance, Path(args.out))
    print(markdown(summary["runs"], summary["op"], args.tolerance), end="")
    failed = [row["label"] for row in summary["runs"] if row.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
