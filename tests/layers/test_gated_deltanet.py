"""Gated DeltaNet: the layer vs a per-step float64 NumPy loop, decode == forward, documents == separate runs.

The recurrence itself (chunked vs recurrent forms and their gradients) is tested in tests/ops/test_gated_delta_rule.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from tests.layers.mixer_helpers import assert_decode_matches_forward, count_params, jitted
from tests.layers.test_conv import numpy_causal_conv


def numpy_silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def numpy_gated_deltanet(layer: GatedDeltaNet, x: np.ndarray) -> np.ndarray:
    """SPEC §9.4 written out with a plain time loop in float64."""
    c = layer.config
    Nv, Nk, dk, dv = c.num_heads, c.num_k_heads, c.k_head_dim, c.v_head_dim
    batch, seq_len, _ = x.shape
    qkv = numpy_causal_conv(
        x @ np.asarray(layer.qkv_proj.kernel[...]), np.asarray(layer.qkv_conv1d.kernel[...]), None, None, silu=True
    )
    ab = x @ np.asarray(layer.ab_proj.kernel[...])
    a, b, gate = ab[..., :Nv], ab[..., Nv : 2 * Nv], ab[..., 2 * Nv :].reshape(batch, seq_len, Nv, dv)
    q = qkv[..., : Nk * dk].reshape(batch, seq_len, Nk, dk)
    k = qkv[..., Nk * dk : 2 * Nk * dk].reshape(batch, seq_len, Nk, dk)
    v = qkv[..., 2 * Nk * dk :].reshape(batch, seq_len, Nv, dv)
    beta = 1.0 / (1.0 + np.exp(-b)) * (2.0 if c.allow_neg_eigval else 1.0)
    dt = np.logaddexp(0.0, a + np.asarray(layer.decay_gate.dt_bias[...]))
    alpha = np.exp(-np.exp(np.asarray(layer.decay_gate.A_log[...])) * dt)
    o = np.zeros((batch, seq_len, Nv, dv))
    for bi in range(batch):
        for n in range(Nv):
            src = n // (Nv // Nk)
            state = np.zeros((dk, dv))
            for t in range(seq_len):
                q_t = q[bi, t, src] / np.sqrt(np.sum(q[bi, t, src] ** 2) + 1e-6) / np.sqrt(dk)
                k_t = k[bi, t, src] / np.sqrt(np.sum(k[bi, t, src] ** 2) + 1e-6)
                state = alpha[bi, t, n] * state
                write = beta[bi, t, n] * np.outer(k_t, v[bi, t, n] - k_t @ state)  # β k (v - Sᵀk)ᵀ
                state = state + write
                o[bi, t, n] = state.T @ q_t
    o = numpy_rms_norm(o * numpy_silu(gate), np.asarray(layer.o_norm.scale[...]), c.norm_eps)
    return o.reshape(batch, seq_len, Nv * dv) @ np.asarray(layer.o_proj.kernel[...])


def make_layer(config, *, hidden=12, dtype=jnp.float32, key=0):
    return GatedDeltaNet(
        hidden, config, num_layers=2, initializer_range=0.4, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key)
    )


@pytest.mark.parametrize("num_k_heads, allow_neg_eigval", [(2, False), (1, True)])
def test_layer_matches_numpy_float64(x64, num_k_heads, allow_neg_eigval):
    config = GatedDeltaNetConfig(
        num_heads=2,
        num_k_heads=num_k_heads,
        k_head_dim=4,
        v_head_dim=3,
        chunk_size=4,
        allow_neg_eigval=allow_neg_eigval,
    )
    layer = make_layer(config, dtype=jnp.float64)
    x = np.random.default_rng(0).standard_normal((2, 10, 12))  # 10 = two full chunks of 4 + a ragged one
    y, state = jitted(layer)(jnp.asarray(x))
    np.testing.assert_allclose(y, numpy_gated_deltanet(layer, x), rtol=1e-10, atol=1e-12)
    assert state.recurrent.shape == (2, 2, 4, 3) and state.conv.shape == (2, 3, 2 * num_k_heads * 4 + 6)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
def test_decode_matches_forward(x64, dtype, tol):
    config = GatedDeltaNetConfig(num_heads=2, num_k_heads=1, k_head_dim=4, v_head_dim=3, chunk_size=3)
    layer = make_layer(config, dtype=dtype, key=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 12)), dtype)
    assert_decode_matches_forward(layer, x, rtol=tol, atol=tol, prefill=4)


def test_segment_ids_equal_separate_documents(x64):
    config = GatedDeltaNetConfig(num_heads=2, num_k_heads=1, k_head_dim=4, v_head_dim=3, chunk_size=4)
    layer = make_layer(config, dtype=jnp.float64, key=5)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 11, 12)))
    starts = [0, 3, 4, 9]  # documents [0, 3), [3, 4), [4, 9), [9, 11)
    segment_ids = jnp.asarray(np.searchsorted(starts, np.arange(11), side="right")[None])
    run = jitted(layer)
    y, state = run(x, segment_ids=segment_ids)
    pieces = []
    for lo, hi in zip(starts, starts[1:] + [11]):
        y_doc, state_doc = run(x[:, lo:hi])
        pieces.append(y_doc)
    np.testing.assert_allclose(y, jnp.concatenate(pieces, axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.recurrent, state_doc.recurrent, rtol=1e-10, atol=1e-12)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="num_k_heads"):
        GatedDeltaNetConfig(num_heads=3, num_k_heads=2)
    with pytest.raises(ValueError, match="chunk_size"):
        GatedDeltaNetConfig(num_heads=2, chunk_size=0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        GatedDeltaNetConfig(num_heads=2, backend="triton")
    with pytest.raises(ValueError, match="x: expected shape"):
        make_layer(GatedDeltaNetConfig(num_heads=2, k_head_dim=4, v_head_dim=3))(jnp.ones((1, 2, 5)))


def test_parameter_count_at_400m():
    config = GatedDeltaNetConfig(num_heads=2, k_head_dim=256, v_head_dim=512)
    count = count_params(lambda: GatedDeltaNet(1024, config, num_layers=24, rngs=nnx.Rngs(0)))
    assert count == 4_207_108  # qkv 2.10M + ab 1.05M + o_proj 1.05M + conv, gate, norm (SPEC §10.2: 4.21M)
