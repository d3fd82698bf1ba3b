"""What a command prints while it works: a header, one line per phase change, and progress with rate and ETA.

On a terminal (the stream is a tty) a live ``tqdm`` bar shows position/total, rate, ETA and the last loss, and
every other line is printed above it. Anywhere else (a pipe, a log file, CI) there is no bar: the periodic record
lines carry ``step N/TOTAL`` with the rate and ETA instead, and nothing is redrawn.

Used by ``m2rnn-jax train`` (:class:`~m2rnn_jax.train.trainer.Trainer`), ``m2rnn-jax eval`` and the metrics
logger; ``docs/cli.md`` shows the output.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO


def format_value(value: Any) -> str:
    """A metric value as printed: floats with 4 significant digits, everything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_duration(seconds: float) -> str:
    """``seconds`` as ``42s``, ``3m07s`` or ``2h05m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Position out of ``total`` since ``initial``: a live tqdm bar on a terminal, and the rate/ETA text of the
    plain lines (:meth:`status`), measured over the positions reached since the last :meth:`status` call.

    ``plain_every``: without a bar, print ``<desc> N/TOTAL (rate, eta)`` at most every this many seconds (None:
    never; the caller's own lines carry :meth:`status`).
    """

    def __init__(
        self,
        console: Console,
        total: int,
        *,
        initial: int = 0,
        desc: str = "",
        unit: str = "step",
        plain_every: float | None = None,
    ):
        self.console, self.total, self.desc, self.unit = console, total, desc, unit
        self.position = initial
        self.plain_every = plain_every
        self._mark = (initial, time.perf_counter())
        self._last_plain = self._mark[1]
        self._bar = None
        if console.live:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=console.stream, dynamic_ncols=True, leave=False
            )

    def update(self, position: int, **postfix: Any) -> None:
        """Moves to ``position``; ``postfix`` values (e.g. ``loss=2.31``) are shown after the bar."""
        if self._bar is not None:
            self._bar.update(position - self.position)
            if postfix:
                self._bar.set_postfix({k: format_value(v) for k, v in postfix.items()}, refresh=False)
        self.position = position
        now = time.perf_counter()
        if self._bar is None and self.plain_every is not None and now - self._last_plain >= self.plain_every:
            self._last_plain = now
            self.console.line(f"{self.desc} {self.status()}")

    def restart_clock(self) -> None:
        """Starts the rate window of :meth:`status` again from here (e.g. after a compile, which is not
        throughput)."""
        self._mark = (self.position, time.perf_counter())

    def status(self) -> str:
        """``N/TOTAL (R unit/s, eta T)`` with the rate over the window since the previous call (or
        :meth:`restart_clock`); just ``N/TOTAL`` when nothing was timed."""
        start, since = self._mark
        now = time.perf_counter()
        self._mark = (self.position, now)
        text = f"{self.position}/{self.total}"
        done, elapsed = self.position - start, now - since
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            text += f" ({rate:.3g} {self.unit}/s, eta {format_duration((self.total - self.position) / rate)})"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.console.progress is self:
            self.console.progress = None


class Console:
    """The stdout of a command: lines, a header, timed phases, records and at most one :class:`Progress`.

    ``enabled=False`` (e.g. every process but the main one) prints nothing; ``live`` (default: ``stream`` is a
    terminal) chooses between the tqdm bar and plain lines.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, live: bool | None = None):
        self._stream = stream
        self.enabled = enabled
        self.live = enabled and (self.stream.isatty() if live is None else live)
        self.progress: Progress | None = None

    @property
    def stream(self) -> TextIO:
        """The stream given, else ``sys.stdout`` as it is now (so that a redirection after construction holds)."""
        return sys.stdout if self._stream is None else self._stream

    def line(self, text: str) -> None:
        """Prints ``text`` (above the live bar, if one is shown)."""
        if not self.enabled:
            return
        if self.progress is not None and self.progress._bar is not None:
            self.progress._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def header(self, title: str, fields: Sequence[tuple[str, Any]]) -> None:
        """``title`` then one aligned ``name  value`` line per field."""
        width = max((len(name) for name, _ in fields), default=0)
        self.line("\n".join([title] + [f"  {name:<{width}}  {value}" for name, value in fields]))

    def phase(self, text: str) -> None:
        """A phase change (``-- text``): compile, curriculum switch, evaluation, checkpoint."""
        self.line(f"-- {text}")

    @contextlib.contextmanager
    def timed_phase(self, text: str, done: str = "done") -> Iterator[None]:
        """``-- text ...`` now and ``-- text: done in X s`` when the block ends."""
        self.phase(f"{text} ...")
        start = time.perf_counter()
        yield
        self.phase(f"{text}: {done} in {time.perf_counter() - start:.1f} s")

    def start_progress(
        self, total: int, *, initial: int = 0, desc: str = "", unit: str = "step", plain_every: float | None = None
    ) -> Progress:
        """A new :class:`Progress` (closing the previous one); :meth:`record` reports its status."""
        if self.progress is not None:
            self.progress.close()
        self.progress = Progress(self, total, initial=initial, desc=desc, unit=unit, plain_every=plain_every)
        return self.progress

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One metrics line, ``eval_len64 step 10: loss=2.31 ...``; while the progress named ``kind`` is at
        ``step`` it ends with its status, ``[10/300 (4.1 step/s, eta 1m10s)]`` (rate since the previous status)."""
        text = f"{kind} step {step}: " + " ".join(f"{k}={format_value(v)}" for k, v in values.items())
        if self.progress is not None and self.progress.desc == kind and self.progress.position == step:
            text += f" [{self.progress.status()}]"
        self.line(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
