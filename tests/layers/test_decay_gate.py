"""Softplus decay gate: SPEC §2.3 init ranges, values vs NumPy, dtypes, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers import SoftplusDecayGate
from m2rnn_jax.layers.decay_gate import inverse_softplus


def numpy_softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def test_init_ranges_follow_spec():
    gate = SoftplusDecayGate(4096, rngs=nnx.Rngs(0))
    A = np.exp(np.asarray(gate.A_log[...], np.float64))
    dt = numpy_softplus(np.asarray(gate.dt_bias[...], np.float64))
    assert gate.A_log[...].dtype == jnp.float32 and gate.dt_bias[...].dtype == jnp.float32
    assert A.min() >= 0.0 and A.max() <= 16.0 * (1 + 1e-6)
    # A ~ U(0, 16): mean 8, std 16 / sqrt(12); 4096 samples give a standard error of 0.07 on the mean
    assert abs(A.mean() - 8.0) < 0.4 and abs(A.std() - 16 / np.sqrt(12)) < 0.3
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    # log dt ~ U(log 1e-3, log 0.1)
    log_dt = np.log(dt)
    assert abs(log_dt.mean() - 0.5 * (np.log(1e-3) + np.log(0.1))) < 0.1


def test_init_floor_clamps_small_time_steps():
    gate = SoftplusDecayGate(64, dt_init_min=1e-6, dt_init_max=1e-5, dt_init_floor=1e-4, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(numpy_softplus(np.asarray(gate.dt_bias[...], np.float64)), 1e-4, rtol=1e-4)


def test_parameters_are_at_least_float32():
    gate = SoftplusDecayGate(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert gate.A_log[...].dtype == jnp.float32 and gate.dt_bias[...].dtype == jnp.float32
    assert gate.A_log.get_metadata()["out_sharding"] == ("heads",)


def test_inverse_softplus_round_trip(x64):
    dt = jnp.geomspace(1e-4, 10.0, 50, dtype=jnp.float64)
    np.testing.assert_allclose(jax.nn.softplus(inverse_softplus(dt)), dt, rtol=1e-12)


@pytest.mark.parametrize("final_exponential", [True, False])
def test_values_match_numpy_float64(x64, final_exponential):
    gate = SoftplusDecayGate(6, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
    assert gate.A_log[...].dtype == jnp.float64
    x = 2.0 * jax.random.normal(jax.random.key(3), (2, 7, 6), jnp.float64)
    A_log, dt_bias = np.asarray(gate.A_log[...]), np.asarray(gate.dt_bias[...])
    log_decay = -np.exp(A_log) * numpy_softplus(np.asarray(x) + dt_bias)
    expected = np.exp(log_decay) if final_exponential else log_decay
    out = gate(x, final_exponential=final_exponential)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(gate.time_step(x), numpy_softplus(np.asarray(x) + dt_bias), rtol=1e-12)


def test_bf16_output_is_float32_math_cast_once():
    gate = SoftplusDecayGate(16, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(5), (3, 16), jnp.float32).astype(jnp.bfloat16)
    f = gate(x, final_exponential=True)
    assert f.dtype == jnp.bfloat16
    expected = np.exp(
        -np.exp(np.asarray(gate.A_log[...], np.float64))
        * numpy_softplus(np.asarray(x.astype(jnp.float32), np.float64) + np.asarray(gate.dt_bias[...], np.float64))
    )
    np.testing.assert_allclose(np.asarray(f.astype(jnp.float32)), expected, rtol=2**-8, atol=1e-30)
    assert float(f.astype(jnp.float32).min()) > 0.0 and float(f.astype(jnp.float32).max()) <= 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"A_init_min": -1.0}, "A_init_min"),
        ({"A_init_min": 2.0, "A_init_max": 1.0}, "A_init_max"),
        ({"dt_init_min": 0.0}, "dt_init_min"),
        ({"dt_init_min": 0.1, "dt_init_max": 0.01}, "dt_init_max"),
        ({"dt_init_floor": -1.0}, "dt_init_floor"),
    ],
)
def test_rejects_bad_init_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftplusDecayGate(4, **kwargs, rngs=nnx.Rngs(0))


def test_rejects_wrong_head_count():
    gate = SoftplusDecayGate(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected last axis of size 4, got shape \(2, 3\)"):
        gate(jnp.ones((2, 3), jnp.float32), final_exponential=True)
    with pytest.raises(ValueError, match="num_heads"):
        SoftplusDecayGate(0, rngs=nnx.Rngs(0))
