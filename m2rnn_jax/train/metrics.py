"""Training metrics: JSONL + TensorBoard event files + stdout lines (through a Console), on the main process only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m2rnn_jax.train.progress import Console
from m2rnn_jax.train.tensorboard import EventFileWriter


class MetricsLogger:
    """Writes every record to ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/``; prints a line per record
    on ``console`` (default: stdout).

    ``enabled=False`` (non-main processes) turns everything off.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = Console(enabled=enabled) if console is None else console
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._events = EventFileWriter(workdir / "tensorboard")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One record (``kind`` = "train", "eval", ...): JSONL line, TensorBoard scalars ``kind/name``, stdout."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {
            f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if scalars:
            self._events.scalars(step, scalars)
        self.console.record(kind, step, values)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.line(text)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()
