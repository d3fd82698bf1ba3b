"""Argument types and checks shared by the ``m2rnn-jax`` subcommands.

The checks raise ``ValueError`` in the one style of :mod:`m2rnn_jax.commands.errors` (``<flag>: expected X, got
Y``); each command turns it into ``m2rnn-jax <command>: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Op backends that run only on one kind of hardware: name -> (jax.default_backend() it needs, words for a user).
BACKEND_HARDWARE: dict[str, tuple[str, str]] = {
    "pallas_gpu": ("gpu", "an NVIDIA GPU"),
    "pallas_tpu": ("tpu", "a TPU"),
}


def positive_int(text: str) -> int:
    """argparse type: an int > 0 (argparse turns the error into ``argument --x: expected a positive int, ...``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


COMPILE_CACHE_DEFAULT = (
    "$M2RNN_JAX_CACHE/compile, i.e. ~/.cache/m2rnn-jax/compile, or JAX_COMPILATION_CACHE_DIR when set"
)


def add_compile_cache_argument(
    p: argparse.ArgumentParser, default: str = COMPILE_CACHE_DEFAULT, prefix: str = ""
) -> None:
    """``--compile-cache DIR|off``: JAX's persistent compilation cache (:mod:`m2rnn_jax.train.compile_cache`);
    ``default`` says in words what happens without the flag, ``prefix`` starts the help text."""
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR|off",
        help=f"{prefix}keep compiled programs (and GPU autotuning results) in DIR for the next process that "
        f"compiles the same program; off: no cache (default: {default})",
    )


def check_backend_hardware(flag: str, backend: str) -> None:
    """Raises ``ValueError`` naming ``flag`` when op backend ``backend`` needs hardware this machine's JAX lacks
    (pallas_gpu: a GPU, pallas_tpu: a TPU); any other name (scan, auto, chunked, ...) passes."""
    import jax

    need = BACKEND_HARDWARE.get(backend)
    if need is None:
        return
    platform, words = need
    here = jax.default_backend()
    if here != platform:
        raise ValueError(
            f"{flag}: expected a backend this machine can run ({backend} needs {words}; JAX's "
            f"default backend here is {here!r}: use scan or auto), got {backend!r}"
        )


def check_preset(flag: str, name: str) -> None:
    """Raises ``ValueError`` naming ``flag`` and listing every preset when ``name`` is not a model or training
    preset."""
    from m2rnn_jax.train.presets import list_presets

    names = list_presets()
    if name not in names:
        raise ValueError(
            f"{flag}: expected a preset name (m2rnn-jax info --list describes them: {', '.join(names)}), got {name!r}"
        )


def existing_directory(flag: str, path: str | Path, what: str = "directory") -> Path:
    """``path`` as a Path; ``ValueError`` naming ``flag`` when it is not an existing directory."""
    if not Path(path).is_dir():
        reason = "not a directory" if Path(path).exists() else "no such directory"
        raise ValueError(f"{flag}: expected an existing {what}, got {str(path)!r} ({reason})")
    return Path(path)
