"""JAX's persistent compilation cache for the commands that compile: train, eval, generate, bench.

A compiled program is written to disk and read back by the next process that compiles the same program on the
same kind of device with the same JAX: a resumed or restarted run, an eval of a run (its evaluation step), a
second generate or benchmark. On GPUs the cache also keeps XLA's GEMM autotuning results per fusion (JAX's
``jax_persistent_cache_enable_xla_caches``), which a different program with the same fusions reuses. Autotuning is
the largest part of a large model's GPU compile: 25 of the 72 s of the 7B hybrid's on an H100
(experiments/RESULTS.md, "Session 20").

``m2rnn-jax train``, ``eval`` and ``generate`` turn the cache on by default, in ``$M2RNN_JAX_CACHE/compile``
(``~/.cache/m2rnn-jax/compile``); ``--compile-cache DIR`` puts it elsewhere and ``--compile-cache off`` leaves it
off. ``bench`` uses it only with ``--compile-cache`` (its ``compile_s`` is a cold compile unless asked). A
directory already set through JAX (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept when no
``--compile-cache`` is given. A change after the process's first compile reopens the cache. A directory used
uncapped before (JAX's default) is made fit for the cap first (:func:`complete_access_times`).
"""

from __future__ import annotations

from pathlib import Path

import filelock
import jax
from jax.experimental.compilation_cache import compilation_cache

from m2rnn_jax.data.builtin_corpora import cache_directory

OFF = "off"
FLAG = "--compile-cache"
# The size a directory chosen here may grow to before JAX evicts the least recently used programs: a cache that is on
# by default must not fill a disk over months of runs (the 400M hybrid's step at B=2 S=1024 took 11 MB on an H100).
DEFAULT_MAX_BYTES = 16 * 2**30


def default_compile_cache() -> Path:
    """``$M2RNN_JAX_CACHE/compile`` (default ``~/.cache/m2rnn-jax/compile``)."""
    return cache_directory() / "compile"


def use_compile_cache(setting: str | None, *, flag: str = FLAG) -> Path | None:
    """Turn JAX's persistent compilation cache on and return its directory (None: off).

    ``setting``: a directory (created if missing), ``"off"``, or None for the default: the directory JAX already
    has (``JAX_COMPILATION_CACHE_DIR``, used with JAX's settings as they are), else :func:`default_compile_cache`.
    A directory chosen here is capped at :data:`DEFAULT_MAX_BYTES` (least recently used programs evicted) unless
    ``JAX_COMPILATION_CACHE_MAX_SIZE`` sets a size. ``ValueError`` naming ``flag`` when the directory is an
    existing file.
    """
    if setting == OFF:
        _configure(enabled=False, directory=jax.config.jax_compilation_cache_dir)
        return None
    if setting is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = Path(setting) if setting is not None else default_compile_cache()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{flag}: expected a directory for the compilation cache or {OFF!r}, got {str(path)!r} (a file)"
        )
    max_size = jax.config.jax_compilation_cache_max_size
    max_size = DEFAULT_MAX_BYTES if max_size == -1 else max_size
    if max_size > 0:
        complete_access_times(path)
    _configure(enabled=True, directory=str(path), max_size=max_size)
    return path


# The file names of JAX's cache (jax._src.lru_cache): a program's "<key>-cache" and, when the cache is capped, its
# last access time "<key>-atime" (8 bytes, nanoseconds, little-endian), both guarded by the lock file.
_PROGRAM_SUFFIX, _ACCESS_TIME_SUFFIX, _LOCK_FILE = "-cache", "-atime", ".lockfile"


def complete_access_times(directory: Path) -> int:
    """Gives every program in ``directory`` that has no access time (written by an uncapped cache: JAX's default,
    or m2rnn-jax before its cap) one, its file's modification time; returns how many. A capped JAX cache reads
    every program's access time before it writes a new one, and a single missing one makes every later write fail
    (a warning, nothing cached). Nothing is done if another process holds the cache's lock for 10 s.
    """
    directory.mkdir(parents=True, exist_ok=True)
    completed = 0
    try:
        with filelock.FileLock(directory / _LOCK_FILE, timeout=10):
            for program in directory.glob(f"*{_PROGRAM_SUFFIX}"):
                access_time = directory / (program.name.removesuffix(_PROGRAM_SUFFIX) + _ACCESS_TIME_SUFFIX)
                if not access_time.exists():
                    access_time.write_bytes(program.stat().st_mtime_ns.to_bytes(8, "little"))
                    completed += 1
    except filelock.Timeout:
        pass
    return completed


def _configure(*, enabled: bool, directory: str | None, max_size: int | None = None) -> None:
    """Sets JAX's cache options (``max_size`` None: unchanged; -1 is JAX's unbounded default); a change after the
    process's first compile reopens the cache (JAX opens it once and would keep using the previous settings)."""
    options = {"jax_enable_compilation_cache": enabled, "jax_compilation_cache_dir": directory}
    if max_size is not None:
        options["jax_compilation_cache_max_size"] = max_size
    if all(getattr(jax.config, name) == value for name, value in options.items()):
        return
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def describe_compile_cache() -> str:
    """Where compiled programs are kept, for a run's start-up header: "cached in DIR" or "not cached"."""
    directory = jax.config.jax_compilation_cache_dir
    if jax.config.jax_enable_compilation_cache and directory:
        return f"cached in {directory}"
    return f"not cached ({FLAG} DIR keeps them)"
