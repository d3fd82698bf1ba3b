"""A one-minute GPU smoke check after refactors: both fused ops (M2RNN ``pallas_gpu``, gated delta rule
``pallas_gpu``) against their references, values and every gradient, at a small shape, and two train steps of
the tiny hybrid (every mixer) with the default backends. Prints one line per check and ``OK`` at the end.

    python experiments/bench/gpu_smoke.py
"""

from __future__ import annotations

import functools
import sys
import tempfile

import jax
import jax.numpy as jnp

from m2rnn_jax import m2rnn
from m2rnn_jax.ops import gated_delta_rule
from m2rnn_jax.testing import (
    op_values_and_grads,
    random_gdn_inputs,
    random_m2rnn_inputs,
    relative_error,
)

GDN_DIFFERENTIABLE = ("q", "k", "v", "beta", "log_alpha", "h0")


def _worst(fast, reference) -> float:
    leaves = zip(jax.tree.leaves((fast.outputs, fast.grads)), jax.tree.leaves((reference.outputs, reference.grads)))
    return max(relative_error(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in leaves)


def check_m2rnn() -> float:
    inputs = random_m2rnn_inputs(
        jax.random.key(0), batch=2, seq_len=256, num_heads=8, k_dim=64, v_dim=16, num_q_heads=1, num_k_heads=1
    )
    key = jax.random.key(1)
    fast = op_values_and_grads(functools.partial(m2rnn, backend="pallas_gpu", gradient_clipping=1.0), inputs, key=key)
    reference = op_values_and_grads(functools.partial(m2rnn, backend="scan", gradient_clipping=1.0), inputs, key=key)
    return _worst(fast, reference)


def check_gdn() -> float:
    inputs = random_gdn_inputs(0, batch=2, seq_len=256, heads=2, k_dim=64, v_dim=128)
    key = jax.random.key(2)
    run = lambda backend: op_values_and_grads(
        functools.partial(gated_delta_rule, backend=backend), inputs, key=key, wrt=GDN_DIFFERENTIABLE
    )
    return _worst(run("pallas_gpu"), run("chunked"))


def check_training() -> None:
    from m2rnn_jax.cli import main

    with tempfile.TemporaryDirectory() as workdir:
        code = main(
            [
                "train",
                "--preset",
                "tiny-hybrid",
                "--workdir",
                workdir,
                "--set",
                "steps=2",
                "--set",
                "optimizer.warmup_steps=1",
                "--set",
                "log_every=1",
                "--set",
                "eval_every=2",
            ]
        )
    assert code == 0, code


def main() -> int:
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for name, check in (("m2rnn pallas_gpu vs scan", check_m2rnn), ("gdn pallas_gpu vs chunked", check_gdn)):
        error = check()
        print(f"{name}: max relative error over outputs and gradients {error:.2e}")
        assert error < 1e-4, error
    check_training()
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
