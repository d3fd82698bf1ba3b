"""Shared pytest fixtures (the compilation cache of every run is set in the repository's conftest.py).

``libtpu_env`` is the environment of a subprocess that compiles for virtual TPUs with libtpu (tpu_aot tests).
float64 checks run inside the ``x64`` fixture (``jax.enable_x64``) instead of turning x64 on for the
whole session, so that the default float32/int32 behaviour of the library is what the other tests see.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

LIBTPU_DIR = REPO / ".venv-tpu"  # where .ci/install_tpu.sh puts libtpu (a --target folder)


@pytest.fixture
def x64():
    """Enable float64 in JAX for the duration of one test."""
    with jax.enable_x64(True):
        yield


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def libtpu_env() -> dict[str, str]:
    """os.environ with libtpu and the repository on PYTHONPATH; skips without libtpu (fails when CI is set)."""
    if not (LIBTPU_DIR / "libtpu").is_dir():
        message = f"libtpu is not installed in {LIBTPU_DIR}; run .ci/install_tpu.sh"
        if _ci():
            pytest.fail(message + " (CI must run it before pytest)")
        pytest.skip(message)
    env = dict(os.environ)
    paths = [str(LIBTPU_DIR), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
