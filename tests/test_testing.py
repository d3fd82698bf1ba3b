"""The shared VJP harness of the op tests (m2rnn_jax.testing.op_values_and_grads) against hand-derived gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.testing import op_values_and_grads, random_cotangents


def _fn(a, b, c=None, scale=1.0):
    """(a * b * scale, a ** 2 (+ c)): gradients da = dy b scale + 2 a dz, db = dy a scale, dc = dz."""
    z = a**2 if c is None else a**2 + c
    return a * b * scale, z


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, 3)), jnp.float32) for _ in range(4)]


def test_gradients_match_hand_derivation_and_constants_pass_through():
    a, b, dy, dz = _arrays(0)
    result = op_values_and_grads(_fn, {"a": a, "b": b, "c": None, "scale": 3.0}, (dy, dz), wrt=("a", "b", "c"))
    y, z = result.outputs
    np.testing.assert_allclose(y, a * b * 3.0, rtol=1e-6)
    np.testing.assert_allclose(z, a**2, rtol=1e-6)
    assert sorted(result.grads) == ["a", "b"]  # c is None: passed through, not differentiated
    np.testing.assert_allclose(result.grads["a"], dy * b * 3.0 + 2 * a * dz, rtol=1e-5)
    np.testing.assert_allclose(result.grads["b"], dy * a * 3.0, rtol=1e-5)
    assert result.cotangents == (dy, dz)


def test_only_names_in_wrt_are_differentiated():
    a, b, c, dz = _arrays(1)
    result = op_values_and_grads(_fn, {"a": a, "b": b, "c": c}, (jnp.zeros_like(a), dz), wrt=("c",))
    assert list(result.grads) == ["c"]
    np.testing.assert_allclose(result.grads["c"], dz)


def test_key_draws_the_cotangents_from_the_output_shapes_and_dtypes():
    a, b, _, _ = _arrays(2)
    inputs = {"a": a, "b": b.astype(jnp.bfloat16).astype(jnp.float32)}
    key = jax.random.key(5)
    result = op_values_and_grads(
        lambda a, b: (a * b, (a + b)[:1].astype(jnp.bfloat16)), inputs, key=key, wrt=("a", "b")
    )
    dy, dz = result.cotangents
    assert dy.shape == (2, 3) and dy.dtype == jnp.float32 and dz.shape == (1, 3) and dz.dtype == jnp.bfloat16
    key_y, key_z = jax.random.split(key)
    np.testing.assert_array_equal(dy, jax.random.normal(key_y, (2, 3), jnp.float32))
    expected = random_cotangents(key, (jax.ShapeDtypeStruct((2, 3), jnp.float32), jnp.zeros((1, 3), jnp.bfloat16)))
    np.testing.assert_array_equal(dz, expected[1])
    np.testing.assert_allclose(result.grads["b"], dy * a + jnp.pad(dz.astype(jnp.float32), ((0, 1), (0, 0))))


@pytest.mark.parametrize("given", ["neither", "both"])
def test_exactly_one_of_cotangents_and_key(given):
    a, b, dy, dz = _arrays(3)
    cotangents, key = (None, None) if given == "neither" else ((dy, dz), jax.random.key(0))
    with pytest.raises(ValueError, match=f"cotangents, key: expected exactly one of them, got {given}"):
        op_values_and_grads(_fn, {"a": a, "b": b}, cotangents, key=key, wrt=("a", "b"))
