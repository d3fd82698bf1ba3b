"""Opt-in value checks that work under ``jax.jit``, ``jax.grad`` and ``jax.vmap`` (``jax.experimental.checkify``).

Shape and dtype errors are found while tracing; values (a forget value of 2.0, a NaN, a decreasing ``cu_seqlens``, a
token id past the vocabulary) are only known when the program runs. The checks here look at values, are off by
default (a program traced without them holds no extra operation) and turn on per call (``check_values=True``) or for
the whole process with the environment variable ``M2RNN_JAX_CHECKS=1``.

How a check surfaces (:func:`run_checks`): the checks of one call are written with :func:`require_values` inside a
function that :func:`jax.experimental.checkify.checkify` turns into an error value. With concrete (eager) inputs the
error is raised at once as ``checkify.JaxRuntimeError`` (a ``ValueError``). Under a transformation the error value
goes to a ``jax.debug.callback`` that raises when the compiled program runs: the jitted call (or the first
``block_until_ready`` on its outputs) raises ``jax.errors.JaxRuntimeError`` whose message ends with the same line,
for example ``f: expected values in (0, 1], got 2.0 at index (0, 3, 1)``. The user's function needs no
``checkify.checkify`` of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

ENV_VAR = "M2RNN_JAX_CHECKS"
_ENV_VALUES = {"": False, "0": False, "1": True}


def checks_enabled(check_values: bool | None) -> bool:
    """Whether a call runs its value checks: ``check_values`` when given, else the environment variable.

    ``None`` reads ``M2RNN_JAX_CHECKS`` (unset, ``""`` or ``"0"``: off; ``"1"``: on) at the moment of the call,
    which under ``jax.jit`` is trace time: a function traced before the variable changed keeps its program (JAX
    shares traces between ``jax.jit`` wrappers of one function), so set it before the process traces anything.
    """
    if check_values is not None:
        if not isinstance(check_values, bool):
            raise ValueError(f"check_values: expected True, False or None, got {check_values!r}")
        return check_values
    raw = os.environ.get(ENV_VAR, "")
    if raw.strip() not in _ENV_VALUES:
        raise ValueError(f"{ENV_VAR}: expected 0 or 1 (or unset), got {raw!r}")
    return _ENV_VALUES[raw.strip()]


def _escape(text: str) -> str:
    """Braces in names and expectations are literal in checkify's format strings."""
    return text.replace("{", "{{").replace("}", "}}")


def require_values(name: str, ok: jax.Array, values: jax.Array, expected: str) -> None:
    """Inside a function run by :func:`run_checks`: fail unless every element of ``ok`` is True.

    ok, values: arrays of one shape; the message names the first failing element (row-major order):
    ``{name}: expected {expected}, got {value} at index (i, j, ...)``.
    """
    if ok.shape != values.shape:
        raise ValueError(f"ok: expected the shape of values {values.shape}, got {ok.shape}")
    bad = jnp.logical_not(ok).reshape(-1)
    first = jnp.argmax(bad)
    index = jnp.unravel_index(first, values.shape) if values.ndim else ()
    value = values.reshape(-1)[first] if values.size else jnp.zeros((), values.dtype)
    if jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))  # bf16 prints like float32
    slots = ", ".join(["{}"] * values.ndim) + ("," if values.ndim == 1 else "")
    message = f"{_escape(name)}: expected {_escape(expected)}, got {{}} at index ({slots})"
    checkify.check(jnp.logical_not(jnp.any(bad)), message, value, *index)


def require_finite(name: str, x: jax.Array) -> None:
    """Inside :func:`run_checks`: every element of the float array ``x`` is finite (no NaN, no +-Inf)."""
    require_values(name, jnp.isfinite(x), x, "finite values")


def _raise(error: checkify.Error) -> None:
    error.throw()


def run_checks(checks: Callable[..., Any], *args: Any) -> None:
    """Run ``checks(*args)`` (calls of :func:`require_values`) as a checkified function and surface its error.

    The arguments pass through ``stop_gradient``: the checks add nothing to any derivative. With concrete inputs a
    failure raises ``checkify.JaxRuntimeError`` (a ``ValueError``) here; under a transformation it raises when the
    program runs (module docstring).
    """
    args = jax.tree.map(jax.lax.stop_gradient, args)
    error, _ = checkify.checkify(checks)(*args)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(error)):
        jax.debug.callback(_raise, error)
    else:
        error.throw()
