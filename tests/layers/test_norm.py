"""RMSNorm vs a float64 NumPy formula, dtype handling and argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers import RMSNorm


def numpy_rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale.astype(np.float64)


def test_rms_norm_matches_numpy_float64(x64):
    norm = RMSNorm(12, eps=1e-5, dtype=jnp.float64, param_dtype=jnp.float64)
    key_x, key_s = jax.random.split(jax.random.key(0))
    norm.scale[...] = 1.0 + 0.3 * jax.random.normal(key_s, (12,), jnp.float64)
    x = 2.0 * jax.random.normal(key_x, (3, 5, 12), jnp.float64)
    y = norm(x)
    assert y.dtype == jnp.float64 and y.shape == x.shape
    np.testing.assert_allclose(y, numpy_rms_norm(np.asarray(x), np.asarray(norm.scale[...]), 1e-5), rtol=1e-12)


def test_rms_norm_eps_matters_for_small_inputs(x64):
    norm = RMSNorm(4, eps=1e-2, dtype=jnp.float64, param_dtype=jnp.float64)
    x = 1e-2 * jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    np.testing.assert_allclose(norm(x), numpy_rms_norm(np.asarray(x), np.ones(4), 1e-2), rtol=1e-12)


def test_rms_norm_bf16_computes_in_float32():
    norm = RMSNorm(64, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = (3.0 * jax.random.normal(jax.random.key(2), (4, 64), jnp.float32)).astype(jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16 and norm.scale[...].dtype == jnp.float32
    expected = numpy_rms_norm(np.asarray(x.astype(jnp.float32)), np.ones(64), 1e-5)
    # only the final rounding to bf16 (relative 2**-8) separates the result from the float64 formula
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=2**-8, atol=1e-6)


def test_rms_norm_scale_metadata_and_init():
    norm = RMSNorm(6, scale_sharding="heads")
    np.testing.assert_array_equal(norm.scale[...], np.ones(6, np.float32))
    assert norm.scale.get_metadata()["out_sharding"] == ("heads",)
    assert isinstance(norm.scale, nnx.Param)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_features": 0}, "num_features"), ({"num_features": 4, "eps": 0.0}, "eps")],
)
def test_rms_norm_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMSNorm(**kwargs)


def test_rms_norm_rejects_wrong_feature_size():
    with pytest.raises(ValueError, match=r"x: expected last axis of size 8, got shape \(2, 7\)"):
        RMSNorm(8)(jnp.ones((2, 7), jnp.float32))
