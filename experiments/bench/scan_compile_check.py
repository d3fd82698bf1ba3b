"""Compile time of the train step with the layers unrolled, scanned per run, and scanned per period (issue 12 item 6).

    python3 experiments/bench/scan_compile_check.py [--preset hybrid-gdn-m2rnn-1l-7b --hidden 32 --remat full]

A tiny-width model (``tiny_config``: hidden ``--hidden``, vocab 256, MoE when the preset has MoE) with the layer
pattern of ``--preset``; the trainer's donated train step (as ``m2rnn-jax bench --compile-only``) is lowered and
compiled for abstract inputs three ways, in one process, ``--repeats`` times in turn (the median is printed):

- ``unrolled``: ``scan_layers=False``, one traced block per layer;
- ``runs``: each run of equal mixer letters one ``lax.scan`` (what ``scan_layers`` was before periods: the decoder's
  ``layer_plan`` replaced by one segment per run);
- ``periods``: ``scan_layers=True``, ``layer_plan``'s runs and periods.

Per way: lower and compile seconds, the ``while`` loops, the characters of the compiled HLO text, the fused
computations in it and how many of them are distinct once instruction names and metadata are left out (XLA compiles
identical kernels once, so equal unrolled blocks cost little codegen; a slice of a stacked parameter or gradient
bakes its offset into the kernel that reads it, so each layer of a stack adds distinct kernels). The widths are tiny
so that the numbers measure the amount of code, not the size of the arrays; on a loaded host only the ratios mean
something.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from unittest import mock

import jax

from m2rnn_jax.bench.model import abstract_train_step
from m2rnn_jax.layers.mlp import MoEConfig
from m2rnn_jax.models import decoder
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.layer_scan import Segment, layer_plan, layer_runs
from m2rnn_jax.models.presets import get_preset, tiny_config

WAYS = ("unrolled", "runs", "periods")


def runs_only_plan(pattern: str) -> list[Segment]:
    """One segment per run of equal letters (scan_layers without periods)."""
    return [Segment(start, (stop - start,)) for start, stop in layer_runs(pattern)]


def distinct_fusions(hlo_text: str) -> tuple[int, int]:
    """(fused computations, distinct ones) of a compiled HLO text, compared without names and metadata."""
    fused = [block for block in hlo_text.split("\n\n") if block.lstrip().startswith("%fused")]
    bodies = {
        re.sub(r"%[\w.\-]+|, metadata=\{[^}]*\}|backend_config=.*", "", block.split("\n", 1)[-1]) for block in fused
    }
    return len(fused), len(bodies)


def compile_step(config: ModelConfig, batch: int, seq_len: int) -> dict:
    """Lower and compile the donated train step for abstract inputs: seconds of each, while loops, HLO size."""
    step, state, tokens = abstract_train_step(config, batch, seq_len)
    start = time.perf_counter()
    lowered = step.lower(state, tokens)
    lowered_at = time.perf_counter()
    executable = lowered.compile()
    compiled_at = time.perf_counter()
    text = executable.as_text()
    fusions, distinct = distinct_fusions(text)
    return {
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "while_loops": text.count(" while("),
        "hlo_chars": len(text),
        "fusions": fusions,
        "distinct_fusions": distinct,
    }


def compile_way(way: str, config: ModelConfig, batch: int, seq_len: int) -> dict:
    if way == "unrolled":
        return compile_step(config, batch, seq_len)
    scanned = config.replace(scan_layers=True)
    if way == "runs":
        with mock.patch.object(decoder, "layer_plan", runs_only_plan):
            return compile_step(scanned, batch, seq_len)
    return compile_step(scanned, batch, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="hybrid-gdn-m2rnn-1l-7b", help="the preset whose layer pattern is used")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="compiles of each way, in turn; the median is shown")
    args = parser.parse_args()
    preset = get_preset(args.preset)
    pattern = preset.layer_pattern
    moe = isinstance(preset.mlp, MoEConfig)
    config = tiny_config(pattern, moe=moe, hidden_size=args.hidden).replace(remat=args.remat)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.preset}'s pattern {pattern} ({len(pattern)})")
    print(f"tiny widths: hidden {args.hidden}, MoE {moe}, remat {args.remat}, B={args.batch} S={args.seq_len}")
    print(f"runs: {len(layer_runs(pattern))}; plan: {[tuple(segment) for segment in layer_plan(pattern)]}")
    rows: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            rows[way].append(compile_way(way, config, args.batch, args.seq_len))
    header = ("lower s", 8), ("compile s", 10), ("while loops", 12), ("HLO chars", 10), ("fusions", 8), ("distinct", 8)
    print(f"{'way':>9} " + " ".join(f"{name:>{width}}" for name, width in header))
    for way, samples in rows.items():
        lower_s = statistics.median(row["lower_s"] for row in samples)
        compile_s = statistics.median(row["compile_s"] for row in samples)
        first = samples[0]
        print(
            f"{way:>9} {lower_s:8.2f} {compile_s:10.2f} {first['while_loops']:12d} {first['hlo_chars']:10d} "
            f"{first['fusions']:8d} {first['distinct_fusions']:8d}"
        )


if __name__ == "__main__":
    main()
