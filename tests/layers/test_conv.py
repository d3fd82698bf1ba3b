"""Causal depthwise conv vs a direct NumPy convolution (float64) and its state continuation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers import CausalDepthwiseConv1d


def numpy_causal_conv(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, state: np.ndarray | None, silu: bool
) -> np.ndarray:
    """x (B, S, C), kernel (ks, C) taps oldest -> newest, state (B, ks - 1, C) earlier raw inputs."""
    batch, seq_len, channels = x.shape
    ks = kernel.shape[0]
    history = np.zeros((batch, ks - 1, channels)) if state is None else state
    padded = np.concatenate([history, x], axis=1)
    y = np.zeros((batch, seq_len, channels))
    for t in range(seq_len):
        for j in range(ks):
            # output t reads input t - (ks - 1) + j, which sits at padded index t + j
            y[:, t] += kernel[j] * padded[:, t + j]
    if bias is not None:
        y += bias
    return y / (1.0 + np.exp(-y)) if silu else y


def make_conv(channels, kernel_size, *, use_bias, activation, key=0, dtype=jnp.float64):
    conv = CausalDepthwiseConv1d(
        channels,
        kernel_size,
        activation=activation,
        use_bias=use_bias,
        initializer_range=0.5,
        dtype=dtype,
        param_dtype=dtype,
        rngs=nnx.Rngs(key),
    )
    if use_bias:
        conv.bias[...] = 0.3 * jax.random.normal(jax.random.key(key + 100), (channels,), dtype)
    return conv


@pytest.mark.parametrize("kernel_size, use_bias, activation", [(4, False, "silu"), (3, True, None), (1, True, "silu")])
def test_conv_matches_numpy_float64(x64, kernel_size, use_bias, activation):
    conv = make_conv(5, kernel_size, use_bias=use_bias, activation=activation)
    x = jax.random.normal(jax.random.key(1), (2, 9, 5), jnp.float64)
    y, state = conv(x)
    bias = np.asarray(conv.bias[...]) if use_bias else None
    expected = numpy_causal_conv(np.asarray(x), np.asarray(conv.kernel[...]), bias, None, activation == "silu")
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(state, np.asarray(x)[:, 9 - (kernel_size - 1) :])


def test_conv_from_given_state_matches_numpy(x64):
    conv = make_conv(3, 4, use_bias=True, activation="silu", key=2)
    x = jax.random.normal(jax.random.key(3), (2, 5, 3), jnp.float64)
    state = jax.random.normal(jax.random.key(4), (2, 3, 3), jnp.float64)
    y, _ = conv(x, state)
    expected = numpy_causal_conv(
        np.asarray(x), np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]), np.asarray(state), True
    )
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunks", [(1,) * 7, (2, 1, 4), (5, 2)])
def test_state_continuation_equals_full_sequence(x64, chunks):
    conv = make_conv(4, 4, use_bias=False, activation="silu", key=5)
    x = jax.random.normal(jax.random.key(6), (3, sum(chunks), 4), jnp.float64)
    full, full_state = conv(x)
    pieces, state, start = [], conv.init_state(3, dtype=jnp.float64), 0
    for length in chunks:
        y, state = conv(x[:, start : start + length], state)
        pieces.append(y)
        start += length
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(state, full_state)


def test_state_keeps_its_dtype_and_bf16_output():
    conv = CausalDepthwiseConv1d(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 3, 8), jnp.float32).astype(jnp.bfloat16)
    y, state = conv(x, conv.init_state(2, dtype=jnp.float32))
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32 and state.shape == (2, 3, 8)
    # raw bf16 inputs survive the float32 state exactly
    np.testing.assert_array_equal(state, x.astype(jnp.float32))
    expected = numpy_causal_conv(
        np.asarray(x.astype(jnp.float32), np.float64), np.asarray(conv.kernel[...], np.float64), None, None, True
    )
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=2**-8, atol=1e-6)


def test_init_statistics_and_metadata():
    conv = CausalDepthwiseConv1d(4096, 4, initializer_range=0.02, rngs=nnx.Rngs(0))
    kernel = np.asarray(conv.kernel[...])
    assert kernel.shape == (4, 4096) and conv.bias is None
    assert abs(kernel.std() - 0.02) < 0.02 * 0.03 and abs(kernel.mean()) < 0.02 * 0.03
    assert conv.kernel.get_metadata()["out_sharding"] == (None, None)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((0, 4), {}, "channels"),
        ((4, 0), {}, "kernel_size"),
        ((4, 4), {"activation": "relu"}, "activation"),
    ],
)
def test_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalDepthwiseConv1d(*args, **kwargs, rngs=nnx.Rngs(0))


def test_rejects_bad_shapes():
    conv = CausalDepthwiseConv1d(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, S, 4\)"):
        conv(jnp.ones((2, 5, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 2, 4\), got \(2, 3, 4\)"):
        conv(jnp.ones((2, 5, 4), jnp.float32), jnp.zeros((2, 3, 4), jnp.float32))
