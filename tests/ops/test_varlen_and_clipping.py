"""Varlen (cu_seqlens) equals separate runs; gradient clipping has the fused-kernel placement (SPEC §0.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax import m2rnn
from m2rnn_jax.ops.clipping import clamp_cotangent
from m2rnn_jax.testing import random_m2rnn_inputs
from tests.ops.numpy_reference import m2rnn_numpy
from tests.ops.test_reference import check_against_numpy, random_cotangents, scan_value_and_grads

OFFSETS = [0, 5, 5, 12, 13, 20]  # includes an empty sequence and a one-token sequence


def test_varlen_matches_numpy_with_clipping(x64):
    inputs = random_m2rnn_inputs(
        jax.random.key(10),
        batch=0,
        seq_len=0,
        num_heads=4,
        k_dim=3,
        v_dim=2,
        num_q_heads=1,
        num_k_heads=2,
        dtype=jnp.float64,
        cu_seqlens=OFFSETS,
    )
    check_against_numpy(inputs)
    check_against_numpy(inputs, clip=0.3)


def test_varlen_equals_separate_dense_runs(x64):
    """Each packed sequence, run alone as a dense batch of one, gives the same y, final state and gradients."""
    inputs = random_m2rnn_inputs(
        jax.random.key(11),
        batch=0,
        seq_len=0,
        num_heads=2,
        k_dim=4,
        v_dim=3,
        num_q_heads=1,
        dtype=jnp.float64,
        cu_seqlens=OFFSETS,
    )
    cot = random_cotangents(jax.random.key(12), inputs)
    y, h, grads = scan_value_and_grads(inputs, cot, clip=0.5)
    for b in range(len(OFFSETS) - 1):
        s, e = OFFSETS[b], OFFSETS[b + 1]
        if s == e:
            np.testing.assert_array_equal(h[b], inputs["h0"][b])  # empty sequence keeps its h0
            np.testing.assert_allclose(grads["h0"][b], cot[1][b], rtol=0, atol=0)
            continue
        dense = {n: inputs[n][s:e][None] for n in ("q", "k", "v", "f")}
        dense.update(W=inputs["W"], h0=inputs["h0"][b : b + 1])
        yb, hb, gb = scan_value_and_grads(dense, (cot[0][s:e][None], cot[1][b : b + 1]), clip=0.5)
        np.testing.assert_allclose(y[s:e], yb[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h[b], hb[0], rtol=1e-12, atol=1e-12)
        for name in ("q", "k", "v", "f"):
            np.testing.assert_allclose(grads[name][s:e], gb[name][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grads["h0"][b], gb["h0"][0], rtol=1e-12, atol=1e-12)


def test_varlen_under_jit_with_traced_offsets():
    inputs = random_m2rnn_inputs(
        jax.random.key(13), batch=0, seq_len=0, num_heads=2, k_dim=2, v_dim=2, cu_seqlens=[0, 3, 8]
    )
    eager = m2rnn(**inputs)
    jitted = jax.jit(lambda a: m2rnn(**a))(inputs)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_clamp_cotangent_is_identity_forward_and_clamps_backward():
    x = jnp.array([0.5, -2.0, 3.0])
    value, vjp = jax.vjp(lambda a: clamp_cotangent(a, 1.0), x)
    np.testing.assert_array_equal(value, x)
    (grad,) = vjp(jnp.array([0.3, -5.0, 2.0]))
    np.testing.assert_array_equal(grad, jnp.array([0.3, -1.0, 1.0]))


def _scalar_case():
    """One head, K = V = 1, S = 2: small enough to differentiate by hand."""
    q = jnp.array([[[[2.0]], [[3.0]]]])  # (B=1, S=2, 1, 1)
    k = jnp.array([[[[1.5]], [[-1.0]]]])
    v = jnp.array([[[[0.8]], [[1.2]]]])
    f = jnp.array([[[0.6], [0.3]]])
    W = jnp.array([[[0.9]]])
    h0 = jnp.array([[[[0.4]]]])
    return q, k, v, W, f, h0


@pytest.mark.parametrize("clip", [None, 0.5])
def test_hand_derived_scalar_gradients(x64, clip):
    """dh0 for L = 10*y_1 + 10*y_2 + 3*h_2 computed by hand (SPEC §4.1), with and without a binding clamp."""
    q, k, v, W, f, h0 = (x.astype(jnp.float64) for x in _scalar_case())
    dy = jnp.full((1, 2, 1, 1), 10.0, jnp.float64)
    dh = jnp.full((1, 1, 1, 1), 3.0, jnp.float64)

    def loss(h0_, W_):
        y, h = m2rnn(q, k, v, W_, f, h0_, gradient_clipping=clip, backend="scan")
        return jnp.sum(y * dy) + jnp.sum(h * dh)

    dh0, dW = jax.grad(loss, argnums=(0, 1))(h0, W)

    # forward by hand
    w, H0 = 0.9, 0.4
    z1 = np.tanh(H0 * w + 1.5 * 0.8)
    H1 = 0.6 * H0 + 0.4 * z1
    z2 = np.tanh(H1 * w + (-1.0) * 1.2)
    # backward by hand: R is the cotangent arriving from the future, clamped before q dy is added
    c = np.inf if clip is None else clip
    r = np.clip(3.0, -c, c)  # final-state cotangent, clamped (binds: 3 > 0.5)
    g2 = 3.0 * 10.0 + r
    dp2 = 0.7 * g2 * (1 - z2**2)
    r = np.clip(0.3 * g2 + dp2 * w, -c, c)  # cotangent of H1 from step 2, clamped (binds)
    g1 = 2.0 * 10.0 + r
    dp1 = 0.4 * g1 * (1 - z1**2)
    expected_dh0 = 0.6 * g1 + dp1 * w  # not clamped
    expected_dW = H1 * dp2 + H0 * dp1
    np.testing.assert_allclose(float(dh0.squeeze()), expected_dh0, rtol=1e-12)
    np.testing.assert_allclose(float(dW.squeeze()), expected_dW, rtol=1e-12)
    if clip is not None:
        assert abs(expected_dh0) > clip  # dh0 itself is left unclamped


def test_clipping_binds_and_changes_only_gradients(x64):
    inputs = random_m2rnn_inputs(
        jax.random.key(14),
        batch=2,
        seq_len=16,
        num_heads=3,
        k_dim=4,
        v_dim=3,
        num_q_heads=1,
        num_k_heads=1,
        dtype=jnp.float64,
    )
    cot = random_cotangents(jax.random.key(15), inputs)
    cot = (10.0 * cot[0], 10.0 * cot[1])  # large cotangents so the clamp at 0.05 binds
    y0, h0, g0 = scan_value_and_grads(inputs, cot)
    y1, h1, g1 = scan_value_and_grads(inputs, cot, clip=-0.05)  # negative means |c|
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(h0, h1)
    np.testing.assert_array_equal(g0["q"], g1["q"])  # dq_t = H_t dy_t does not see the state cotangent
    for name in ("k", "v", "W", "f", "h0"):
        assert not np.allclose(g0[name], g1[name]), name
    ref = m2rnn_numpy(
        *(inputs[n] for n in ("q", "k", "v", "W", "f", "h0")),
        dy=np.asarray(cot[0]),
        dh_final=np.asarray(cot[1]),
        clip=0.05,
    )[2]
    for name in g1:
        np.testing.assert_allclose(g1[name], ref[name], rtol=1e-10, atol=1e-12)


def test_clip_placement_differs_from_total_cotangent_clamp(x64):
    """The torch-loop placement (clamp of the total cotangent) is a different function; we follow the kernel."""
    inputs = random_m2rnn_inputs(
        jax.random.key(16), batch=1, seq_len=6, num_heads=2, k_dim=3, v_dim=2, dtype=jnp.float64
    )
    cot = random_cotangents(jax.random.key(17), inputs)
    cot = (20.0 * cot[0], cot[1])
    _, _, ours = scan_value_and_grads(inputs, cot, clip=0.1)
    kernel = m2rnn_numpy(
        *(inputs[n] for n in ("q", "k", "v", "W", "f", "h0")),
        dy=np.asarray(cot[0]),
        dh_final=np.asarray(cot[1]),
        clip=0.1,
    )[2]
    np.testing.assert_allclose(ours["h0"], kernel["h0"], rtol=1e-10)
    assert np.max(np.abs(ours["h0"])) > 0.1  # dh0 unclamped, unlike a total-cotangent clamp at the last step
