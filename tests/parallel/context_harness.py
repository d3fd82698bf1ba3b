"""Harness of the context-parallel tests: checks run on 8 fake CPU devices in one subprocess per test module (this
process keeps its own device count), and a sharded-vs-single-device comparison of outputs and every gradient.

A test module defines ``{name: check}`` (each check a no-argument function that raises on a mismatch), calls
:func:`run_checks` from pytest and :func:`main` under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

DEVICES = 8
ROOT = Path(__file__).resolve().parents[2]


def run_checks(module: str, names: list[str], timeout: float = 600) -> dict[str, str]:
    """Run ``python -m module names...`` on 8 fake CPU devices; returns {name: "OK" or the failure text}."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    result = subprocess.run(
        [sys.executable, "-m", module, *names], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    outcome = {name: f"no result (exit {result.returncode}):\n{result.stdout}\n{result.stderr}" for name in names}
    for block in result.stdout.split("\0"):
        status, _, rest = block.strip().partition(" ")
        name, _, detail = rest.partition("\n")
        if status in ("OK", "FAIL") and name in outcome:
            outcome[name] = "OK" if status == "OK" else detail
    return outcome


def main(checks: dict[str, Callable[[], None]]) -> None:
    """Subprocess side: float64 on, 8 devices asserted, run the checks named on the command line (all if none)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == DEVICES, f"expected {DEVICES} fake CPU devices, got {jax.device_count()}"
    for name in sys.argv[1:] or list(checks):
        try:
            checks[name]()
        except Exception:  # report every failing check, not only the first
            print(f"\0FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"\0OK {name}", flush=True)


def context_mesh(context: int, data: int = 1):
    """A (data, context) mesh of Auto axes on the first data * context devices."""
    import jax
    from jax.sharding import AxisType

    return jax.make_mesh(
        (data, context), ("data", "context"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[: data * context]
    )


def assert_sharded_matches(sharded: Callable, single: Callable, args: dict, tol: float, seed: int = 0) -> None:
    """``sharded(**args)`` equals ``single(**args)`` (a pytree of outputs), and so do the gradients of
    ``sum(outputs * random cotangents)`` with respect to every floating-point argument (an argument may be a pytree
    such as module parameters; None and integer / bool arguments are held fixed): relative error
    (:func:`m2rnn_jax.testing.relative_error`) below ``tol`` for every leaf; the failure message lists each leaf
    that misses, with its error."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2rnn_jax.testing import relative_error

    def floating(a) -> bool:
        leaves = jax.tree.leaves(a)
        return bool(leaves) and all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves)

    wrt = {k: a for k, a in args.items() if floating(a)}
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda w: single(**{**args, **w}), wrt)
    cotangents = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), shapes)

    def outputs_and_gradients(fn):  # one compile per implementation
        def run(w):
            outputs, vjp = jax.vjp(lambda w: fn(**{**args, **w}), w)
            return outputs, vjp(cotangents)[0]

        return jax.jit(run)(wrt)

    failures = []
    (got_outputs, got_gradients), (outputs, gradients) = outputs_and_gradients(sharded), outputs_and_gradients(single)
    for label, got, want in (("output", got_outputs, outputs), ("gradient", got_gradients, gradients)):
        for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
            error = relative_error(g, w)
            if not error < tol:
                failures.append(f"{label}{jax.tree_util.keystr(path)}: relative error {error:.3e} >= {tol:g}")
    assert not failures, "\n".join(failures)
