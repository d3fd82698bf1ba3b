"""The MoE's grouped matmul: megablox kernels (Pallas interpret mode on CPU) == jax.lax.ragged_dot, values and
both gradients, with rows in no group, row counts that are not a multiple of the row tile, and the SwiGLU experts
with biases; the config choices are validated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.layers.grouped_matmul import grouped_matmul, resolve_grouped_matmul
from m2rnn_jax.layers.mlp import MoEConfig, expert_swiglu

TOLERANCE = 1e-4  # float32; the interpret-mode kernels accumulate tiles in another order than ragged_dot


def _loss(fn):
    def loss(*args):
        y = fn(*args)
        return jnp.sum(y * jnp.cos(y))

    return jax.value_and_grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("rows,group_sizes", [(40, (10, 0, 25)), (130, (0, 64, 66))])
def test_megablox_matches_ragged_dot(rows, group_sizes):
    x = jax.random.normal(jax.random.key(0), (rows, 8))
    kernel = jax.random.normal(jax.random.key(1), (3, 8, 6))
    sizes = jnp.asarray(group_sizes, jnp.int32)
    expected = _loss(lambda x, w: grouped_matmul(x, w, sizes, jnp.float32, "ragged_dot"))(x, kernel)
    got = _loss(lambda x, w: grouped_matmul(x, w, sizes, jnp.float32, "megablox", interpret=True))(x, kernel)
    y_expected = grouped_matmul(x, kernel, sizes, jnp.float32, "ragged_dot")
    y_got = grouped_matmul(x, kernel, sizes, jnp.float32, "megablox", interpret=True)
    np.testing.assert_allclose(y_got, y_expected, atol=TOLERANCE)
    assert float(jnp.abs(y_got[sum(group_sizes) :]).max(initial=0.0)) == 0.0  # rows in no group: zero
    np.testing.assert_allclose(got[0], expected[0], rtol=TOLERANCE)
    for a, b in zip(got[1], expected[1]):
        np.testing.assert_allclose(a, b, atol=TOLERANCE * max(1.0, float(jnp.abs(b).max())))
        assert bool(jnp.all(jnp.isfinite(a)))


def test_expert_swiglu_megablox_matches_ragged_dot():
    keys = jax.random.split(jax.random.key(2), 5)
    weights = {
        "c_fc": (jax.random.normal(keys[0], (4, 8, 12)), jax.random.normal(keys[1], (4, 12))),
        "c_proj": (jax.random.normal(keys[2], (4, 6, 8)) * 0.3, jax.random.normal(keys[3], (4, 8))),
    }
    rows = jax.random.normal(keys[4], (20, 8))
    sizes = jnp.asarray([5, 7, 0, 6], jnp.int32)  # 2 rows in no group
    row_experts = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(20), side="right"), 3)

    def run(implementation, interpret):
        def loss(rows, weights):
            y = expert_swiglu(rows, sizes, row_experts, weights, jnp.float32, implementation, interpret=interpret)
            return jnp.sum(y[:18] * jnp.cos(y[:18]))

        return jax.value_and_grad(loss, argnums=(0, 1))(rows, weights)

    expected, got = run("ragged_dot", False), run("megablox", True)
    np.testing.assert_allclose(got[0], expected[0], rtol=TOLERANCE)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(a, b, atol=TOLERANCE * max(1.0, float(jnp.abs(b).max())))


def test_choices_are_validated():
    on_tpu = jax.default_backend() == "tpu"
    assert resolve_grouped_matmul("auto", 1536, 256) == ("megablox" if on_tpu else "ragged_dot")
    assert resolve_grouped_matmul("auto", 64, 32) == "ragged_dot"  # widths the kernels do not take
    with pytest.raises(ValueError, match="kernel: expected widths .* multiples of 128 for 'megablox'"):
        grouped_matmul(jnp.ones((2, 64)), jnp.ones((1, 64, 32)), jnp.asarray([2]), jnp.float32, "megablox")
    with pytest.raises(ValueError, match="grouped_matmul: expected one of"):
        MoEConfig(num_experts=4, top_k=2, intermediate_size=8, grouped_matmul="dense")
    with pytest.raises(ValueError, match="dispatch: expected one of"):
        MoEConfig(num_experts=4, top_k=2, intermediate_size=8, dispatch="ragged")
    with pytest.raises(ValueError, match="implementation: expected"):
        grouped_matmul(jnp.ones((2, 3)), jnp.ones((1, 3, 4)), jnp.asarray([2]), jnp.float32, "dense")
