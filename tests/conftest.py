"""Shared pytest fixtures.

float64 checks run inside the ``x64`` fixture (``jax.enable_x64``) instead of turning x64 on for the
whole session, so that the default float32/int32 behaviour of the library is what the other tests see.
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
    """Enable float64 in JAX for the duration of one test."""
    with jax.enable_x64(True):
        yield
