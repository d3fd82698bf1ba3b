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
_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s)\b")
_PASS_START = re.compile(r"^\s*HLO pass (\S+)$")
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
    module with the longest span).

    Passes nest: a pipeline can run as a pass of another, and a pass can compile other modules (the GEMM autotuner
    compiles every candidate fusion as its own module, with its own pipelines). Only outermost passes, those that
    start while no other pass is open, are summed; a nested module's lines belong to the module whose pass runs it.
    """
    by_module = collections.defaultdict(list)  # top-level module -> its records, nested compiles included
    outermost = []  # (module, pipeline, pass name, seconds) of every outermost pass
    open_passes: list[str] = []
    current = pipeline = None
    for record in records:
        message = record[3]
        if not open_passes and (m := _PIPELINE.search(message)):
            current, pipeline = m.group(1), m.group(2)
        elif m := _PASS_START.search(message):
            open_passes.append(m.group(1))
        elif (m := _PASS.search(message)) and open_passes:
            open_passes.pop()
            if not open_passes:
                outermost.append((current, pipeline, m.group(1), float(m.group(2)) * _UNIT[m.group(3)]))
        if current is not None:
            by_module[current].append(record)
    if not by_module:
        return "no 'Running HLO pass pipeline' lines: set TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1"

    if module is None:
        module = max(by_module, key=lambda name: by_module[name][-1][0] - by_module[name][0][0])
    recs = by_module[module]
    by_pass, by_pipeline = collections.Counter(), collections.Counter()
    for owner, pipeline, name, seconds in outermost:
        if owner == module:
            by_pass[name] += seconds
            by_pipeline[pipeline] += seconds
    span = recs[-1][0] - recs[0][0]
    passes = sum(by_pass.values())
    gaps = sorted(((b[0] - a[0], a) for a, b in zip(recs, recs[1:])), key=lambda gap: gap[0], reverse=True)[:top]
    lines = [
        f"module {module}: {span:.1f} s from its first to its last log line; HLO passes {passes:.1f} s; "
        f"outside the passes {span - passes:.1f} s",
        "",
        "pipelines (summed time of their outermost passes):",
        *(f"  {seconds:8.2f} s  {name}" for name, seconds in by_pipeline.most_common(top)),
        "",
        "outermost passes (summed over every run):",
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
