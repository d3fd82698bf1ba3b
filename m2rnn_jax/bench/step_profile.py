"""Where a train step's device time goes: the step of ``m2rnn-jax bench --model`` under ``jax.profiler``, its
device kernels summed per source line of the model code, per source file, and per kernel.

    python -m m2rnn_jax.bench.step_profile --model hybrid-gdn-m2rnn-1l-400m --batch 8 --seq-len 4096 \
        --out /tmp/profile [--json profile.json]

The step is compiled, run twice to warm up, then ``--steps`` steps are traced (``create_perfetto_trace``; the
step's optimized HLO and the counted kernel events are written beside the trace as ``train_step.hlo.txt.gz`` and
``kernels.json.gz``, enough to summarize again with :func:`summarize` and :func:`instruction_sources`). Each
device event of the trace names the HLO instruction it ran (``hlo_op``); the optimized HLO of the step gives that
instruction's ``op_name`` (the jaxpr path: ``transpose(...)`` marks the backward) and the ``source_file`` /
``source_line`` of the JAX call that produced it. Times are per step (the traced total / ``--steps``), in ms.
Events without a known instruction (or on a host-only platform, where the trace has no device kernels) are
grouped under their kernel name. Group keys name sources, not operations: the ``op_name`` shown beside a row is
one example of the instructions summed in it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax

from m2rnn_jax.bench.model import SEED, random_batch, resolve_config, train_step_function
from m2rnn_jax.bench.timing import compile_timed
from m2rnn_jax.train.state import init_train_state

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\d+))')
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')
PACKAGE_MARKERS = ("m2rnn_jax/", "pallas_kernels/")
FRAMES_SHOWN = 2  # project frames named per source (innermost first)


def _fields(text: str) -> dict[str, str]:
    return {key: number or quoted for key, quoted, number in _FIELD.findall(text)}


def _tables(hlo_text: str) -> dict[str, dict[int, Any]]:
    """The module's ``FileNames``, ``FunctionNames``, ``FileLocations`` and ``StackFrames`` tables (id -> entry)."""
    tables: dict[str, dict[int, Any]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        match = _TABLE_ROW.match(line) if current is not None else None
        if match is None:
            current = None
            continue
        current[int(match[1])] = match[2] if match[3] is None else _fields(match[3])
    return tables


def short_source(path: str) -> str | None:
    """A source path cut to the part inside the project (``m2rnn_jax/layers/mlp.py``); None outside it."""
    for marker in PACKAGE_MARKERS:
        if marker in path:
            return marker + path.split(marker, 1)[1]
    return None


def _project_frames(frame_id: int, tables: dict[str, dict[int, Any]]) -> list[str]:
    """``file:function:line`` of the project's frames of one stack, innermost first; without any, the innermost
    frame of the stack in parentheses (``(flax/nnx/nn/linear.py:__call__:300)``)."""
    frames, locations = tables.get("StackFrames", {}), tables.get("FileLocations", {})
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    out, seen, innermost = [], set(), None
    while frame_id in frames and frame_id not in seen:
        seen.add(frame_id)
        frame = frames[frame_id]
        location = locations.get(int(frame.get("file_location_id", 0)), {})
        full_path = files.get(int(location.get("file_name_id", 0)), "")
        if innermost is None:
            function = functions.get(int(location.get("function_name_id", 0)), "?")
            innermost = f"({'/'.join(full_path.split('/')[-3:])}:{function}:{location.get('line', '?')})"
        path = short_source(full_path)
        if path is not None and not (out and out[-1].startswith(f"{path.removeprefix('m2rnn_jax/')}:")):
            function = functions.get(int(location.get("function_name_id", 0)), "?")
            out.append(f"{path.removeprefix('m2rnn_jax/')}:{function}:{location.get('line', '?')}")
        # The text format prints a frame's parent as its id + 1 (the root's parent as 1): the caller is one less.
        frame_id = int(frame.get("parent_frame_id", 1)) - 1
    return out or ([innermost] if innermost else [])


def instruction_sources(hlo_text: str) -> dict[str, dict[str, str]]:
    """``{instruction name: {"op_name", "source"}}`` from optimized HLO text: ``source`` names the innermost
    project frames of the instruction's stack (``layers/mlp.py:__call__:140 < models/decoder.py:__call__:88``), or
    ``source_file:source_line`` where the module has no stack-frame tables (older jax)."""
    tables = _tables(hlo_text)
    sources = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        fields = _fields(match[2])
        if "stack_frame_id" in fields:
            frames = _project_frames(int(fields["stack_frame_id"]), tables)
            source = " < ".join(frames[:FRAMES_SHOWN]) if frames else "(no frames)"
        elif "source_file" in fields:
            source = f"{short_source(fields['source_file']) or fields['source_file']}:{fields.get('source_line', '?')}"
        else:
            source = "(no source)"
        sources[match[1]] = {"op_name": fields.get("op_name", ""), "source": source}
    return sources


def direction(op_name: str) -> str:
    """``backward`` for instructions of a VJP's transpose, ``forward`` otherwise."""
    return "backward" if "transpose(" in op_name else "forward"


def device_events(trace: dict | list) -> tuple[list[dict], dict[str, float]]:
    """The kernel events of a trace, and the busy ms of every device thread (for checking what was counted).

    Kernel events are the complete ('X') events of the device processes (names containing ``/device:``), on their
    ``Stream`` threads when there are any (GPU traces also hold derived ``XLA Ops`` / ``XLA Modules`` lines that
    repeat the same time); on a host-only trace, the events that carry an ``hlo_op``.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    metadata = [event for event in events if event.get("ph") == "M"]
    device_pids = {
        event["pid"]
        for event in metadata
        if event.get("name") == "process_name" and "/device:" in str(event.get("args", {}).get("name", ""))
    }
    thread_names = {
        (event["pid"], event.get("tid")): str(event.get("args", {}).get("name", ""))
        for event in metadata
        if event.get("name") == "thread_name"
    }
    complete = [event for event in events if event.get("ph") == "X" and "dur" in event]
    threads: collections.Counter = collections.Counter()
    for event in complete:
        if event["pid"] in device_pids:
            threads[thread_names.get((event["pid"], event.get("tid")), "?")] += event["dur"] / 1e3
    if not device_pids:
        return [event for event in complete if "hlo_op" in event.get("args", {})], dict(threads)
    kernels = [event for event in complete if event["pid"] in device_pids]
    streams = [event for event in kernels if "Stream" in thread_names.get((event["pid"], event.get("tid")), "")]
    return streams or kernels, dict(threads)


def summarize(events: Iterable[dict], sources: dict[str, dict[str, str]], steps: int, top: int = 40) -> dict:
    """Per-step device ms grouped by source line (and direction), by source file and by kernel name."""
    by_line: collections.Counter = collections.Counter()
    by_file: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    # A fusion's kernel is named after its instruction ("loop_convert_fusion_72" for "loop_convert_fusion.72"):
    # the fallback where the event's hlo_op names a command buffer (CUDA graph) instead of the instruction.
    by_kernel_name = {re.sub(r"[.\-]", "_", name): source for name, source in sources.items()}
    total = 0.0
    for event in events:
        ms = event["dur"] / 1e3 / steps
        total += ms
        args = event.get("args", {})
        hlo_op = args.get("hlo_op", "")
        source = sources.get(hlo_op) or by_kernel_name.get(event["name"], {})
        file = source["source"].split(":", 1)[0] if source else "(unknown)"
        line = f"{source['source']} {direction(source['op_name'])}" if source else None
        by_file[file] += ms
        by_kernel[event["name"]] += ms
        key = line or f"(kernel) {event['name']}"
        by_line[key] += ms
        examples.setdefault(key, source.get("op_name", hlo_op)[-160:])

    def rows(counter: collections.Counter, with_example: bool = False) -> list[dict]:
        out = []
        for name, ms in counter.most_common(top):
            row = {"name": name, "ms": round(ms, 4), "percent": round(100 * ms / total, 2) if total else 0.0}
            if with_example:
                row["op_name"] = examples.get(name, "")
            out.append(row)
        return out

    return {
        "device_ms_per_step": round(total, 4),
        "by_source_line": rows(by_line, with_example=True),
        "by_source_file": rows(by_file),
        "by_kernel": rows(by_kernel),
    }


def load_trace(log_dir: str) -> dict | list:
    """The newest perfetto trace that ``jax.profiler.trace(log_dir, create_perfetto_trace=True)`` wrote."""
    paths = sorted(
        glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime
    )
    if not paths:
        raise FileNotFoundError(f"--out: no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(paths[-1], "rt") as handle:
        return json.load(handle)


def profile_calls(run: Callable[[], Any], executable: Any, name: str, steps: int, log_dir: str, top: int) -> dict:
    """Traces ``steps`` calls of ``run`` (compiled and warmed up by the caller; each call runs ``executable`` once)
    and summarizes their device kernels with ``executable``'s optimized HLO; writes ``{name}.hlo.txt.gz`` and
    ``kernels.json.gz`` beside the trace in ``log_dir``."""
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            result = run()
        jax.block_until_ready(result)
    hlo_text = executable.as_text()
    with gzip.open(os.path.join(log_dir, f"{name}.hlo.txt.gz"), "wt") as handle:  # for reading a profile later
        handle.write(hlo_text)
    kernels, threads = device_events(load_trace(log_dir))
    with gzip.open(os.path.join(log_dir, "kernels.json.gz"), "wt") as handle:  # the counted events, compactly
        json.dump(
            [
                {"name": k["name"], "dur": k["dur"], "args": {"hlo_op": k.get("args", {}).get("hlo_op", "")}}
                for k in kernels
            ],
            handle,
        )
    return {
        "device_thread_ms": {thread: round(ms / steps, 3) for thread, ms in threads.items()},
        **summarize(kernels, instruction_sources(hlo_text), steps, top),
    }


def profile_step(preset: str, batch: int, seq_len: int, remat: str | None, steps: int, log_dir: str, top: int) -> dict:
    """Compiles the trainer's step for ``preset``, traces ``steps`` steps after two warm-up steps and summarizes."""
    config = resolve_config(preset, remat=remat)
    step, optimizer = train_step_function(config)
    tokens = random_batch(config, batch, seq_len)
    state = jax.jit(lambda: init_train_state(config, optimizer, SEED))()
    compiled = compile_timed(step, state, tokens)
    for _ in range(2):
        state, _ = compiled.executable(state, tokens)
    jax.block_until_ready(state)

    def run() -> Any:
        nonlocal state
        state, _ = compiled.executable(state, tokens)
        return state

    summary = profile_calls(run, compiled.executable, "train_step", steps, log_dir, top)
    return {
        "preset": preset,
        "batch": batch,
        "seq_len": seq_len,
        "remat": config.remat,
        "steps": steps,
        "compile_s": round(compiled.compile_s, 2),
        **summary,
    }


def format_summary(summary: dict) -> str:
    """A step profile's header and three tables as plain text."""
    return (
        f"{summary['preset']} B={summary['batch']} S={summary['seq_len']} remat={summary['remat']}: "
        + format_tables(summary)
    )


def format_tables(summary: dict) -> str:
    """The device time per call and the three tables (per source file, line, kernel) of :func:`summarize`."""
    lines = [f"device time {summary['device_ms_per_step']:.2f} ms per step"]
    for key, title in (
        ("by_source_file", "per source file"),
        ("by_source_line", "per source line"),
        ("by_kernel", "per kernel"),
    ):
        lines.append(f"\n{title} (ms per step, % of device time)")
        for row in summary[key]:
            extra = f"  [{row['op_name'][-90:]}]" if row.get("op_name") else ""
            lines.append(f"{row['ms']:9.3f} {row['percent']:6.2f}%  {row['name']}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="preset name (m2rnn-jax info --list)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--remat", default=None, help="none, full, save_dots (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3, help="traced steps (default 3)")
    parser.add_argument("--top", type=int, default=40, help="rows per table (default 40)")
    parser.add_argument("--out", required=True, help="directory for the profiler's trace")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "steps", "top"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    summary = profile_step(args.model, args.batch, args.seq_len, args.remat, args.steps, args.out, args.top)
    print(format_summary(summary))
    if args.json:
        temporary = args.json + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(summary, handle, indent=1)
        os.replace(temporary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
