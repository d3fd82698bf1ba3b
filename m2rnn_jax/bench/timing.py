"""Timing and memory helpers shared by the op and model benchmarks.

A timing is the median over ``repeats`` batches of ``iters`` back-to-back calls, after ``warmup`` calls, each batch
closed by ``jax.block_until_ready``; it is reported in ms per call. Memory comes from the compiled executable
(``memory_analysis``: temporaries, arguments, outputs) and, where the device reports it, from the allocator
(``memory_stats``: the process-wide peak).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

GIB = 2**30


# JAX's events of the compile stages (jax.monitoring time spans), by the name a report gives their seconds.
COMPILE_PHASE_EVENTS = {
    "trace_s": "/jax/core/compile/jaxpr_trace_duration",  # Python -> jaxpr
    "lower_s": "/jax/core/compile/jaxpr_to_mlir_module_duration",  # jaxpr -> StableHLO (Pallas kernels lower here)
    "backend_compile_s": "/jax/core/compile/backend_compile_duration",  # XLA (or the persistent cache)
}


class Compiled(NamedTuple):
    """A compiled executable and what compiling it cost.

    Attributes:
        executable: the ``jax.stages.Compiled`` (call it like the jitted function).
        compile_s: seconds spent in ``lower`` + ``compile``.
        phases: seconds of each stage (keys of :data:`COMPILE_PHASE_EVENTS`; a stage JAX did not report is absent).
    """

    executable: Any
    compile_s: float
    phases: dict[str, float]


@contextlib.contextmanager
def compile_phases() -> Iterator[dict[str, float]]:
    """Collects the compile stages' seconds while the block runs, into the yielded dict (keys of
    :data:`COMPILE_PHASE_EVENTS`, filled when the block ends).

    Only top-level spans count: a computation compiled while the function is traced (a constant evaluated eagerly)
    reports its own stages inside the trace's span, and those stay part of the trace. So the stages never overlap
    and never sum past the block's time.
    """
    phases: dict[str, float] = {}
    names = {event: name for name, event in COMPILE_PHASE_EVENTS.items()}
    spans: list[tuple[str, float, float]] = []

    def listener(event: str, start: float, end: float, **_: Any) -> None:
        if event in names:
            spans.append((names[event], start, end))

    jax.monitoring.register_event_time_span_listener(listener)
    try:
        yield phases
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)
        for index, (name, start, end) in enumerate(spans):
            nested = any(
                other_start <= start and end <= other_end and (other_start, other_end) != (start, end)
                for other_index, (_, other_start, other_end) in enumerate(spans)
                if other_index != index
            )
            if not nested:
                phases[name] = phases.get(name, 0.0) + (end - start)


def compile_timed(fn: Callable[..., Any], *args: Any) -> Compiled:
    """Lowers and compiles ``fn`` (a ``jax.jit`` function) for ``args``, timing both stages together and each
    compile stage (:func:`compile_phases`)."""
    with compile_phases() as phases:
        start = time.perf_counter()
        executable = fn.lower(*args).compile()
        elapsed = time.perf_counter() - start
    return Compiled(executable, elapsed, dict(phases))


def median_ms(fn: Callable[..., Any], *args: Any, iters: int = 10, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of one call ``fn(*args)`` in ms, over ``repeats`` batches of ``iters`` calls after
    ``warmup`` calls. ``fn`` may be a closure that carries state between calls (a train step feeding its output
    state back)."""
    for name, value in (("iters", iters), ("repeats", repeats)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(samples)


def temp_bytes(executable: Any) -> int | None:
    """Bytes of device memory a compiled call allocates beyond its arguments and outputs (None if unknown)."""
    analysis = executable.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def footprint_bytes(executable: Any) -> int | None:
    """Bytes a compiled call holds at once by its own analysis: arguments + outputs - donated aliases + temporaries
    (None if unknown)."""
    analysis = executable.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def peak_bytes(device: jax.Device | None = None) -> int | None:
    """The allocator's peak bytes in use on ``device`` (default: the first device) since the process started,
    or None where the device does not report memory statistics (CPUs)."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats() or {}
    value = stats.get("peak_bytes_in_use")
    return None if value is None else int(value)


def to_gib(n: int | None) -> float | None:
    """Bytes -> GiB, passing None through."""
    return None if n is None else n / GIB
