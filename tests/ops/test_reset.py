"""The op's ``reset`` (document boundaries inside a dense row): equal to running each document alone from zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax import m2rnn
from m2rnn_jax.testing import random_m2rnn_inputs
from tests.ops.test_reference import random_cotangents, scan_value_and_grads

# row 0: documents [0, 4) [4, 5) [5, 9); row 1: a reset at t = 0 (h0 ignored), then [0, 7) [7, 9)
STARTS = ([4, 5], [0, 7])
SEQ_LEN = 9


def _reset_mask() -> jnp.ndarray:
    reset = np.zeros((len(STARTS), SEQ_LEN), dtype=bool)
    for b, starts in enumerate(STARTS):
        reset[b, starts] = True
    return jnp.asarray(reset)


def _documents(b: int) -> list[tuple[int, int]]:
    bounds = sorted({0, *STARTS[b], SEQ_LEN})
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("clip", [None, 0.3])
def test_reset_equals_separate_documents(x64, clip):
    """y, h_final and the gradients of every input equal separate runs of each document (float64, 1e-12)."""
    inputs = random_m2rnn_inputs(
        jax.random.key(20),
        batch=2,
        seq_len=SEQ_LEN,
        num_heads=4,
        k_dim=3,
        v_dim=2,
        num_q_heads=1,
        num_k_heads=2,
        num_w_heads=2,
        dtype=jnp.float64,
    )
    cot = random_cotangents(jax.random.key(21), inputs)
    y, h, grads = scan_value_and_grads(inputs, cot, clip=clip, reset=_reset_mask())
    dW = np.zeros_like(np.asarray(grads["W"]))
    for b in range(len(STARTS)):
        documents = _documents(b)
        for i, (s, e) in enumerate(documents):
            last = i == len(documents) - 1
            doc = {n: inputs[n][b : b + 1, s:e] for n in ("q", "k", "v", "f")}
            continues_h0 = s == 0 and 0 not in STARTS[b]
            h0 = inputs["h0"][b : b + 1] if continues_h0 else jnp.zeros_like(inputs["h0"][b : b + 1])
            dh = cot[1][b : b + 1] if last else jnp.zeros_like(cot[1][b : b + 1])
            yd, hd, gd = scan_value_and_grads(dict(doc, W=inputs["W"], h0=h0), (cot[0][b : b + 1, s:e], dh), clip=clip)
            np.testing.assert_allclose(y[b, s:e], yd[0], rtol=1e-12, atol=1e-12)
            for name in ("q", "k", "v", "f"):
                np.testing.assert_allclose(grads[name][b, s:e], gd[name][0], rtol=1e-12, atol=1e-12)
            dW += np.asarray(gd["W"])
            if last:
                np.testing.assert_allclose(h[b], hd[0], rtol=1e-12, atol=1e-12)
            if s == 0:
                expected_dh0 = gd["h0"][0] if continues_h0 else np.zeros_like(gd["h0"][0])
                np.testing.assert_allclose(grads["h0"][b], expected_dh0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["W"], dW, rtol=1e-11, atol=1e-12)


def test_no_reset_is_the_plain_op():
    inputs = random_m2rnn_inputs(jax.random.key(22), batch=2, seq_len=SEQ_LEN, num_heads=2, k_dim=4, v_dim=2)
    plain = m2rnn(**inputs, backend="scan", gradient_clipping=1.0)
    masked = m2rnn(**inputs, backend="scan", gradient_clipping=1.0, reset=jnp.zeros((2, SEQ_LEN), bool))
    for a, b in zip(plain, masked):
        np.testing.assert_array_equal(a, b)


def test_reset_changes_the_result():
    """A reset really cuts the state: the document after it differs from the unreset run."""
    inputs = random_m2rnn_inputs(jax.random.key(23), batch=2, seq_len=SEQ_LEN, num_heads=2, k_dim=4, v_dim=2)
    plain, _ = m2rnn(**inputs, backend="scan")
    masked, _ = m2rnn(**inputs, backend="scan", reset=_reset_mask())
    np.testing.assert_array_equal(plain[0, :4], masked[0, :4])
    assert np.max(np.abs(np.asarray(plain[0, 4:] - masked[0, 4:]))) > 1e-3


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu", "auto"])
def test_pallas_backends_with_reset_run_the_scan(backend):
    """A Pallas backend with ``reset`` gives the scan backend's result (it runs the scan, op docstring)."""
    inputs = random_m2rnn_inputs(jax.random.key(24), batch=2, seq_len=SEQ_LEN, num_heads=2, k_dim=4, v_dim=2)
    expected = m2rnn(**inputs, backend="scan", reset=_reset_mask(), gradient_clipping=0.5)
    got = m2rnn(**inputs, backend=backend, reset=_reset_mask(), gradient_clipping=0.5)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_reset_under_jit():
    inputs = random_m2rnn_inputs(jax.random.key(25), batch=2, seq_len=SEQ_LEN, num_heads=2, k_dim=2, v_dim=2)
    eager = m2rnn(**inputs, reset=_reset_mask(), backend="scan")
    jitted = jax.jit(lambda a, r: m2rnn(**a, reset=r, backend="scan"))(inputs, _reset_mask())
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_reset_validation():
    inputs = random_m2rnn_inputs(jax.random.key(26), batch=2, seq_len=SEQ_LEN, num_heads=2, k_dim=2, v_dim=2)
    with pytest.raises(ValueError, match=r"reset: expected shape \(B, S\) = \(2, 9\), got \(2, 8\)"):
        m2rnn(**inputs, reset=jnp.zeros((2, 8), bool))
    with pytest.raises(ValueError, match="reset: expected a bool array, got dtype int32"):
        m2rnn(**inputs, reset=jnp.zeros((2, SEQ_LEN), jnp.int32))
    packed = random_m2rnn_inputs(
        jax.random.key(27), batch=0, seq_len=0, num_heads=2, k_dim=2, v_dim=2, cu_seqlens=[0, 3, 5]
    )
    with pytest.raises(ValueError, match="reset: expected None with cu_seqlens"):
        m2rnn(**packed, reset=jnp.zeros((2, 5), bool))
