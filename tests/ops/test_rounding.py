"""``stored_in``: a cast that, when it narrows, is kept behind an optimization barrier (values and gradients as the
plain cast's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops.rounding import stored_in
from m2rnn_jax.testing import jaxpr_equations


@pytest.mark.parametrize(
    "source, target, barrier",
    [
        (jnp.float32, jnp.bfloat16, True),
        (jnp.float32, jnp.float16, True),
        (jnp.float64, jnp.float32, True),
        (jnp.bfloat16, jnp.bfloat16, False),
        (jnp.float32, jnp.float32, False),
        (jnp.bfloat16, jnp.float32, False),
    ],
)
def test_values_gradients_and_barrier(x64, source, target, barrier):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), source)

    def loss(fn, x):
        return jnp.sum(jnp.square(fn(x, target).astype(jnp.float32)))

    assert stored_in(x, target).dtype == jnp.dtype(target)
    np.testing.assert_array_equal(np.asarray(stored_in(x, target)), np.asarray(x.astype(target)))
    grad = jax.grad(lambda x: loss(stored_in, x))(x)
    expected = jax.grad(lambda x: loss(lambda a, d: a.astype(d), x))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(expected))
    jaxpr = jax.make_jaxpr(lambda x: stored_in(x, target))(x).jaxpr
    assert len(jaxpr_equations(jaxpr, "optimization_barrier")) == int(barrier)
