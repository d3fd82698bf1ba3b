"""RNN and GRU baselines vs per-step float64 NumPy loops, state-gradient clipping vs a hand-written BPTT,
decode == forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers.gru import GRU, GRUConfig
from m2rnn_jax.layers.rnn import RNN, RNNConfig, clipped_recurrence
from tests.layers.mixer_helpers import assert_decode_matches_forward, count_params, jitted
from tests.layers.test_conv import numpy_causal_conv
from tests.layers.test_gated_deltanet import numpy_rms_norm, numpy_silu


def numpy_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_vector_rnn(layer, x: np.ndarray, gru: bool) -> np.ndarray:
    """SPEC §9.4 RNN / GRU written out with a plain time loop in float64."""
    c = layer.config
    N, d = c.num_heads, c.head_dim
    batch, seq_len, _ = x.shape
    blocks = np.split(x @ np.asarray(layer.input_projection.kernel[...]), 4 if gru else 2, axis=-1)
    if c.kernel_size is None:
        first = numpy_silu(blocks[0])
    else:
        first = numpy_causal_conv(blocks[0], np.asarray(layer.conv1d.kernel[...]), None, None, silu=True)
    xs, gates = first.reshape(batch, seq_len, N, d), [b.reshape(batch, seq_len, N, d) for b in blocks[1:-1]]
    weights = np.split(np.asarray(layer.state_weight[...]), 3 if gru else 1, axis=0)
    hs = np.zeros((batch, seq_len, N, d))
    for b in range(batch):
        for n in range(N):
            h = np.zeros(d)
            for t in range(seq_len):
                if gru:
                    forget = numpy_sigmoid(h @ weights[1][n] + gates[0][b, t, n])
                    reset = numpy_sigmoid(h @ weights[2][n] + gates[1][b, t, n])
                    h = forget * h + (1 - forget) * np.tanh((h * reset) @ weights[0][n] + xs[b, t, n])
                else:
                    h = np.tanh(h @ weights[0][n] + xs[b, t, n])
                hs[b, t, n] = h
    y = numpy_rms_norm(
        hs.reshape(batch, seq_len, N * d) * numpy_silu(blocks[-1]), np.asarray(layer.norm.scale[...]), c.norm_eps
    )
    return y @ np.asarray(layer.output_projection.kernel[...])


def make_layer(cls, config, *, hidden=10, dtype=jnp.float32, key=0):
    return cls(hidden, config, num_layers=2, initializer_range=0.4, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key))


@pytest.mark.parametrize(
    "cls, config_cls, kernel_size", [(RNN, RNNConfig, 4), (RNN, RNNConfig, None), (GRU, GRUConfig, 3)]
)
def test_layer_matches_numpy_float64(x64, cls, config_cls, kernel_size):
    config = config_cls(num_heads=3, head_dim=4, kernel_size=kernel_size)  # no conv: SiLU applied directly
    layer = make_layer(cls, config, dtype=jnp.float64)
    x = np.random.default_rng(0).standard_normal((2, 7, 10))
    y, state = jitted(layer)(jnp.asarray(x))
    np.testing.assert_allclose(y, numpy_vector_rnn(layer, x, gru=cls is GRU), rtol=1e-10, atol=1e-12)
    assert state.recurrent.shape == (2, 3, 4)


def numpy_rnn_backward(xs, W, h0, dys, dfinal, limit):
    """Hand-written BPTT of h_t = tanh(h_{t-1} W + x_t) (one head), with the op's clamp placement:
    the cotangent arriving from step t+1 (or of the final state) is clamped, then dy_t is added; dh0 unclamped."""
    hs = [h0]
    for x_t in xs:
        hs.append(np.tanh(hs[-1] @ W + x_t))
    dxs, dW, R = np.zeros_like(xs), np.zeros_like(W), dfinal
    for t in range(len(xs) - 1, -1, -1):
        G = dys[t] + np.clip(R, -limit, limit)
        dpre = G * (1 - hs[t + 1] ** 2)
        dxs[t], dW, R = dpre, dW + np.outer(hs[t], dpre), dpre @ W.T
    return dxs, dW, R


def test_state_gradient_clipping_matches_hand_written_bptt(x64):
    rng = np.random.default_rng(1)
    S, d, limit = 9, 4, 0.05
    xs, W, h0 = rng.standard_normal((S, d)), rng.normal(0, 0.8, (d, d)), rng.standard_normal(d)
    dys, dfinal = rng.standard_normal((S, d)), rng.standard_normal(d)

    def loss(xs, W, h0, clip):
        step = lambda h, inputs: jnp.tanh(jnp.einsum("bnd,nde->bne", h, W[None]) + inputs[0])
        hs, final = clipped_recurrence(step, h0[None, None], (xs[None, :, None],), clip)
        return jnp.sum(hs[0, :, 0] * dys) + jnp.sum(final[0, 0] * dfinal)

    args = (jnp.asarray(xs), jnp.asarray(W), jnp.asarray(h0))
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args, limit)
    for got, expected in zip(grads, numpy_rnn_backward(xs, W, h0, dys, dfinal, limit)):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    unclipped = jax.grad(loss, argnums=(0, 1, 2))(*args, None)
    assert not np.allclose(unclipped[1], grads[1])  # the clamp was active
    for got, expected in zip(unclipped, numpy_rnn_backward(xs, W, h0, dys, dfinal, np.inf)):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls, config_cls", [(RNN, RNNConfig), (GRU, GRUConfig)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
def test_decode_matches_forward(x64, cls, config_cls, dtype, tol):
    layer = make_layer(cls, config_cls(num_heads=2, head_dim=4), dtype=dtype, key=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 10)), dtype)
    assert_decode_matches_forward(layer, x, rtol=tol, atol=tol, prefill=2)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="head_dim"):
        RNNConfig(num_heads=4, head_dim=0)
    with pytest.raises(ValueError, match="gradient_clipping"):
        GRUConfig(num_heads=4, gradient_clipping="1")
    with pytest.raises(ValueError, match="activation_function"):
        RNNConfig(num_heads=4, activation_function="relu")


def test_parameter_counts_at_400m():
    rnn = count_params(lambda: RNN(1024, RNNConfig(num_heads=85), num_layers=24, rngs=nnx.Rngs(0)))
    gru = count_params(lambda: GRU(1024, GRUConfig(num_heads=85), num_layers=24, rngs=nnx.Rngs(0)))
    width = 85 * 16
    assert rnn == 1024 * 2 * width + 4 * width + 85 * 256 + width + width * 1024 == 4_206_480  # SPEC: 4.21M
    assert gru == 1024 * 4 * width + 4 * width + 3 * 85 * 256 + width + width * 1024 == 7_035_280  # SPEC: 7.04M
