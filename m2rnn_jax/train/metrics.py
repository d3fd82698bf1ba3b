"""Training metrics: JSONL + TensorBoard event files + stdout lines / a progress bar, on the main process only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from m2rnn_jax.train.tensorboard import EventFileWriter


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressBar:
    """A one-line bar redrawn in place on a terminal; on a pipe it stays silent (log lines carry the news)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30):
        stream = sys.stdout if stream is None else stream
        self.total, self.stream, self.width = total, stream, width
        self.enabled = stream.isatty()
        self._last = 0.0

    def update(self, step: int, text: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and step < self.total):
            return
        self._last = now
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {step}/{self.total} {text}\033[K")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class MetricsLogger:
    """Writes every record to ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/``; prints a line per record.

    ``enabled=False`` (non-main processes) turns everything off.
    """

    def __init__(self, workdir: str | Path, *, total_steps: int, enabled: bool = True, stream: TextIO | None = None):
        self.enabled, self.stream = enabled, sys.stdout if stream is None else stream
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._events = EventFileWriter(workdir / "tensorboard")
        self.progress = ProgressBar(total_steps, stream)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One record (``kind`` = "train", "eval", ...): JSONL line, TensorBoard scalars ``kind/name``, stdout."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self._events.scalars(step, scalars)
        self.progress.clear()
        self.stream.write(f"{kind} step {step}: " + " ".join(f"{k}={_format(v)}" for k, v in values.items()) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def tick(self, step: int, text: str = "") -> None:
        if self.enabled:
            self.progress.update(step, text)

    def close(self) -> None:
        if self.enabled:
            self.progress.clear()
            self._jsonl.close()
            self._events.close()
