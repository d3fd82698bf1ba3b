"""Per-chip HBM of a TPU train step from the TPU compiler's buffer assignment, without waiting for code generation.

On this project's 2-core CPU host libtpu's backend code generation (LLO passes) of a paper preset's train step takes
hours and more than the host's memory (experiments/RESULTS.md, "Session 6: TPU pod compiles"), while the HLO passes
and the buffer assignment, which fix every HBM buffer, finish in minutes. This script runs ``m2rnn-jax compile`` in
a child process with XLA's dump enabled, waits for the train step's ``*after_optimizations-buffer-assignment.txt``,
stops the child and reads the allocations of HBM (color 0): entry parameters (the arguments: parameters, optimizer
state, batch shard) and the preallocated temporaries (activations, gradients, workspace at the peak). Code
generation still adds temporaries (hybrid-m2rnn-400m at 4096 tokens, 1 sequence per chip: +0.47 GB on 1.57 GB;
small programs: a few MB); the numbers are the buffer assignment's, called an estimate wherever they are quoted.

    PYTHONPATH=.venv-tpu:. python -m m2rnn_jax.bench.tpu_buffer_assignment --json out.json -- \\
        --preset hybrid-m2rnn-400m --topology v5e:2x4 --mesh data=2,fsdp=4 --batch 8 --remat full

Everything after ``--`` goes to ``m2rnn-jax compile`` unchanged. Prints one JSON object (also written to --json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*):$", re.M)
GIB = 2**30


def hbm_allocations(text: str) -> dict[str, int]:
    """Bytes of HBM (color 0) allocations by kind (parameter / temp / constant / thread-local / live-out) in an XLA
    buffer-assignment dump."""
    totals: dict[str, int] = collections.Counter()
    for match in ALLOCATION.finditer(text):
        size, rest = int(match.group(1)), match.group(2)
        color = re.search(r"color (\d+)", rest)
        if color and int(color.group(1)) != 0:
            continue
        for kind in ("parameter", "preallocated-temp", "constant", "thread-local", "live-out"):
            if kind in rest:
                totals[kind] += size
                break
        else:
            totals["other"] += size
    return dict(totals)


def _wait_for_dump(dump: Path, child: subprocess.Popen, timeout: float) -> Path | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        found = sorted(dump.glob("*jit_train_step*after_optimizations-buffer-assignment.txt"))
        if found and time.time() - found[-1].stat().st_mtime > 5:  # written completely (file times are wall-clock)
            return found[-1]
        time.sleep(5)
    found = sorted(dump.glob("*jit_train_step*after_optimizations-buffer-assignment.txt"))
    return found[-1] if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the buffer assignment")
    parser.add_argument(
        "--keep-dump", default=None, help="dump XLA's files to this folder (kept) instead of a temporary one"
    )
    parser.add_argument("compile_args", nargs=argparse.REMAINDER, help="-- then the m2rnn-jax compile arguments")
    args = parser.parse_args()
    compile_args = [a for a in args.compile_args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="tpu_ba_") as tmp:
        dump = Path(args.keep_dump or tmp)
        dump.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()}
        start = time.monotonic()
        log = dump / "compile.log"  # a file, not a pipe: a full pipe would stall the compile
        with open(log, "w") as output:
            child = subprocess.Popen(
                [sys.executable, "-m", "m2rnn_jax", "compile", *compile_args],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            found = _wait_for_dump(dump, child, args.timeout)
            seconds = time.monotonic() - start
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        if found is None:
            print(log.read_text()[-4000:], file=sys.stderr)
            print("no buffer assignment of jit_train_step was written", file=sys.stderr)
            return 1
        hbm = hbm_allocations(found.read_text())
    result = {
        "compile_args": compile_args,
        "seconds_to_buffer_assignment": round(seconds, 1),
        "argument_bytes": hbm.get("parameter", 0),
        "temp_bytes": hbm.get("preallocated-temp", 0),
        "other_bytes": sum(v for k, v in hbm.items() if k not in ("parameter", "preallocated-temp")),
    }
    result["total_gib"] = (result["argument_bytes"] + result["temp_bytes"] + result["other_bytes"]) / GIB
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
