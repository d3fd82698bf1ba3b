"""Mamba2: the layer vs a per-step float64 NumPy loop, decode == forward (the SSD forms: tests/ops/test_ssd.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers.mamba2 import Mamba2, Mamba2Config
from tests.layers.mixer_helpers import assert_decode_matches_forward, count_params, jitted
from tests.layers.test_conv import numpy_causal_conv
from tests.layers.test_gated_deltanet import numpy_rms_norm, numpy_silu


def numpy_mamba2(layer: Mamba2, x: np.ndarray) -> np.ndarray:
    """SPEC §9.4 written out with a plain time loop in float64."""
    c = layer.config
    I, H, P, N, G = c.intermediate_size, c.num_heads, c.head_dim, c.state_size, c.num_groups
    batch, seq_len, _ = x.shape
    projected = x @ np.asarray(layer.in_proj.kernel[...])
    z, xBC, dt_raw = projected[..., :I], projected[..., I : I + c.conv_channels], projected[..., I + c.conv_channels :]
    xBC = numpy_causal_conv(
        xBC, np.asarray(layer.conv1d.kernel[...]), np.asarray(layer.conv1d.bias[...]), None, silu=True
    )
    xs = xBC[..., :I].reshape(batch, seq_len, H, P)
    B = xBC[..., I : I + G * N].reshape(batch, seq_len, G, N)
    C = xBC[..., I + G * N :].reshape(batch, seq_len, G, N)
    dt = np.logaddexp(0.0, dt_raw + np.asarray(layer.decay_gate.dt_bias[...]))
    A = -np.exp(np.asarray(layer.decay_gate.A_log[...]))
    D = np.asarray(layer.D[...])
    y = np.zeros((batch, seq_len, H, P))
    for b in range(batch):
        for h in range(H):
            g = h // (H // G)
            state = np.zeros((P, N))
            for t in range(seq_len):
                state = np.exp(dt[b, t, h] * A[h]) * state + dt[b, t, h] * np.outer(xs[b, t, h], B[b, t, g])
                y[b, t, h] = state @ C[b, t, g] + D[h] * xs[b, t, h]
    y = numpy_rms_norm(y.reshape(batch, seq_len, I) * numpy_silu(z), np.asarray(layer.norm.scale[...]), c.norm_eps)
    return y @ np.asarray(layer.out_proj.kernel[...])


def make_layer(config, *, hidden=12, dtype=jnp.float32, key=0):
    layer = Mamba2(
        hidden, config, num_layers=2, initializer_range=0.4, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key)
    )
    layer.conv1d.bias[...] = jnp.asarray(np.random.default_rng(key).normal(0.0, 0.3, layer.conv1d.bias.shape), dtype)
    layer.D[...] = jnp.asarray(np.random.default_rng(key + 1).uniform(0.5, 1.5, layer.D.shape), dtype)
    return layer


@pytest.mark.parametrize("num_groups", [1, 2])
def test_layer_matches_numpy_float64(x64, num_groups):
    config = Mamba2Config(num_heads=4, intermediate_size=12, state_size=5, num_groups=num_groups, chunk_size=4)
    layer = make_layer(config, dtype=jnp.float64)
    x = np.random.default_rng(0).standard_normal((2, 10, 12))  # two full chunks of 4 + a ragged one
    y, state = jitted(layer)(jnp.asarray(x))
    np.testing.assert_allclose(y, numpy_mamba2(layer, x), rtol=1e-10, atol=1e-12)
    assert state.recurrent.shape == (2, 4, 3, 5) and state.conv.shape == (2, 3, 12 + 2 * num_groups * 5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
def test_decode_matches_forward(x64, dtype, tol):
    config = Mamba2Config(num_heads=2, intermediate_size=8, state_size=6, chunk_size=3)
    layer = make_layer(config, dtype=dtype, key=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 12)), dtype)
    assert_decode_matches_forward(layer, x, rtol=tol, atol=tol, prefill=4)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="intermediate_size"):
        Mamba2Config(num_heads=5, intermediate_size=12)
    with pytest.raises(ValueError, match="num_groups"):
        Mamba2Config(num_heads=4, intermediate_size=12, num_groups=3)


def test_parameter_count_at_400m():
    config = Mamba2Config(num_heads=64, intermediate_size=1216, state_size=216)
    count = count_params(lambda: Mamba2(1024, config, num_layers=24, rngs=nnx.Rngs(0)))
    in_proj = 1024 * (2 * 1216 + 2 * 216 + 64)
    conv = (1216 + 2 * 216) * 5  # 4 taps + bias
    assert count == in_proj + conv + 3 * 64 + 1216 + 1216 * 1024 == 4_253_104  # SPEC §10.2: 4.25M
