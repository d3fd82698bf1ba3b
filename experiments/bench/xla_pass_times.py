"""Where XLA's backend compile spends its time, from its own log (issue 12 item 6).

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1,gpu_compiler=1 \
        python3 -m m2rnn_jax bench --model PRESET --compile-only ... 2> compile.log
    python3 experiments/bench/xla_pass_times.py compile.log [--module jit_step] [--top 25]

XLA logs every HLO pass's wall time (``hlo_pass_pipeline.cc``, "HLO pass: NAME time: ...") and the start of every
pass pipeline. This sums the pass times by pass name and by the pipeline started last, for the module of the log
with the longest span (the train step; the small jits around it are left out), and reports the time between the
first and the last line of that module that no pass accounts for: code generation (LLVM, PTX, ptxas), GEMM
autotuning and anything else XLA does outside its HLO passes. The largest gaps are listed with the line that
precedes each, which names what ran.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from datetime import datetime

_LINE = re.compile(r"^[IWEF](\d{4} \d\d:\d\d:\d\d\.\d{6})\s+(\d+)\s+(\S+)\] (.*)$")
_PASS = re.compile(r"HLO pass: (\S+) time: (\d+) (us|ms|s)\b")
_PIPELINE = re.compile(r"Running HLO pass pipeline on module (\S+): (.*)$")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse(lines) -> list[tuple[float, str, str, str]]:
    """(seconds since the first line, thread, source file:line, message) of every glog line."""
    out, first = [], None
    for line in lines:
        match = _LINE.match(line.rstrip("\n"))
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%m%d %H:%M:%S.%f").timestamp()
        first = stamp if first is None else first
        out.append((stamp - first, match.group(2), match.group(3), match.group(4)))
    return out


def report(records, module: str | None = None, top: int = 25) -> str:
    """Pass time by pass name and by pipeline, and the time no pass accounts for, of one module (default: the
    module with the longest span)."""
    by_module = collections.defaultdict(list)  # module -> records from its first pipeline to the next module's
    current = None
    for record in records:
        pipeline = _PIPELINE.search(record[3])
        if pipeline:
            current = pipeline.group(1)
        if current is not None:
            by_module[current].append(record)
    if not by_module:
        return "no 'Running HLO pass pipeline' lines: set TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1"

    if module is None:
        module = max(by_module, key=lambda name: by_module[name][-1][0] - by_module[name][0][0])
    recs = by_module[module]
    # A pipeline can run inside another as one of its passes: its "HLO pass" line holds its own passes' time, so
    # only passes that are not pipelines are summed.
    pipelines = {m.group(2) for r in recs if (m := _PIPELINE.search(r[3]))}
    by_pass, by_pipeline = collections.Counter(), collections.Counter()
    pipeline = "?"
    for _, _, _, message in recs:
        if m := _PIPELINE.search(message):
            pipeline = m.group(2)
        elif (m := _PASS.search(message)) and m.group(1) not in pipelines:
            seconds = int(m.group(2)) * _UNIT[m.group(3)]
            by_pass[m.group(1)] += seconds
            by_pipeline[pipeline] += seconds
    span = recs[-1][0] - recs[0][0]
    passes = sum(by_pass.values())
    gaps = sorted(((b[0] - a[0], a) for a, b in zip(recs, recs[1:])), key=lambda gap: gap[0], reverse=True)[:top]
    lines = [
        f"module {module}: {span:.1f} s from its first to its last log line; HLO passes {passes:.1f} s; "
        f"outside the passes {span - passes:.1f} s",
        "",
        "pipelines (summed pass time, by the pipeline started last):",
        *(f"  {seconds:8.2f} s  {name}" for name, seconds in by_pipeline.most_common(top)),
        "",
        "passes (summed over every run):",
        *(f"  {seconds:8.2f} s  {name}" for name, seconds in by_pass.most_common(top)),
        "",
        "largest gaps between two log lines (the line before each):",
        *(f"  {seconds:8.2f} s  at {at:7.1f} s  {source}  {text[:110]}" for seconds, (at, _, source, text) in gaps),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="stderr of the compile, with TF_CPP_VMODULE=hlo_pass_pipeline=1")
    parser.add_argument("--module", default=None, help="module name (default: the one with the longest span)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as fh:
        print(report(parse(fh), args.module, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
