"""The PyTorch reference op against a float64 NumPy loop, finite differences and a hand-derived case."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from m2rnn_jax.interop.torch_reference import m2rnn_torch  # noqa: E402
from tests.interop.inputs import numpy_m2rnn_inputs  # noqa: E402


def _numpy_m2rnn(q, k, v, W, f, h0):
    """Float64 per-head, per-step loop of SPEC §2.1; heads broadcast by n // (N // N_x)."""
    batch, seq_len = q.shape[:2]
    n, k_dim, v_dim = h0.shape[1:]
    y = np.zeros((batch, seq_len, n, v_dim))
    h_final = np.zeros_like(h0)
    for b in range(batch):
        for head in range(n):
            src = lambda x, axis, head=head: head // (n // x.shape[axis])
            h = h0[b, head].copy()
            w = W[src(W, 0)]
            for t in range(seq_len):
                q_t = q[b, t, src(q, 2)]
                k_t = k[b, t, src(k, 2)]
                v_t = v[b, t, src(v, 2)]
                f_t = f[b, t, src(f, 2)]
                z = np.tanh(h @ w + np.outer(k_t, v_t))
                h = f_t * h + (1.0 - f_t) * z
                y[b, t, head] = h.T @ q_t
            h_final[b, head] = h
    return y, h_final


def _torch(arrays, requires_grad=False):
    return {name: torch.tensor(x, dtype=torch.float64, requires_grad=requires_grad) for name, x in arrays.items()}


@pytest.mark.parametrize("counts", [(3, 3, 3, 3, 3), (1, 1, 6, 6, 6), (2, 4, 8, 8, 2), (4, 2, 1, 2, 4)], ids=str)
def test_forward_matches_numpy_loop(counts):
    arrays = numpy_m2rnn_inputs(0, batch=2, seq_len=5, counts=counts, k_dim=3, v_dim=4)
    y_ref, h_ref = _numpy_m2rnn(**arrays)
    y, h = m2rnn_torch(**_torch(arrays))
    assert y.dtype == torch.float64 and h.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h.numpy(), h_ref, rtol=1e-12, atol=1e-12)


def test_h0_none_is_zero_state():
    arrays = numpy_m2rnn_inputs(1, batch=2, seq_len=4, counts=(1, 1, 2, 2, 2), k_dim=3, v_dim=2)
    arrays["h0"] = np.zeros_like(arrays["h0"])
    y_ref, h_ref = _numpy_m2rnn(**arrays)
    tensors = _torch(arrays)
    del tensors["h0"]
    y, h = m2rnn_torch(**tensors)
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h.numpy(), h_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("counts", [(2, 2, 2, 2, 2), (1, 1, 2, 2, 1)], ids=str)
def test_gradients_match_finite_differences(counts):
    arrays = numpy_m2rnn_inputs(2, batch=1, seq_len=3, counts=counts, k_dim=2, v_dim=3)
    tensors = _torch(arrays, requires_grad=True)
    names = ("q", "k", "v", "W", "f", "h0")

    def both_outputs(*inputs):
        return m2rnn_torch(*inputs)

    assert torch.autograd.gradcheck(both_outputs, tuple(tensors[n] for n in names), atol=1e-8, rtol=1e-6)


def test_varlen_equals_separate_runs():
    counts, lengths = (1, 2, 4, 4, 4), (3, 0, 5, 1)
    arrays = numpy_m2rnn_inputs(3, batch=1, seq_len=sum(lengths), counts=counts, k_dim=3, v_dim=2)
    packed = {name: arrays[name][0] for name in ("q", "k", "v", "f")}  # (T, ...)
    W = arrays["W"]
    h0 = np.tanh(np.random.default_rng(4).normal(size=(len(lengths), 4, 3, 2)))
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    y, h = m2rnn_torch(
        **_torch(packed), W=torch.tensor(W), h0=torch.tensor(h0), cu_seqlens=cu_seqlens, gradient_clipping=0.3
    )
    start = 0
    for b, length in enumerate(lengths):
        piece = {name: x[None, start : start + length] for name, x in packed.items()}
        piece["W"] = W
        y_ref, h_ref = _numpy_m2rnn(**piece, h0=h0[b : b + 1])
        np.testing.assert_allclose(y[start : start + length].numpy(), y_ref[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h[b].numpy(), h_ref[0], rtol=1e-12, atol=1e-12)
        start += length


def _hand_case(clip):
    """One head, K = V = 1, S = 2; loss = a1 y1 + a2 y2 + b h2; gradients derived by hand (SPEC §4.1)."""
    h0, w = 0.3, 0.9
    (q1, k1, v1, f1), (q2, k2, v2, f2) = (1.5, 0.8, 1.2, 0.6), (-2.0, -0.5, 0.7, 0.4)
    a1, a2, b = 1.0, 0.8, 2.5
    cl = (lambda r: max(-clip, min(clip, r))) if clip is not None else (lambda r: r)
    # forward
    z1 = math.tanh(h0 * w + k1 * v1)
    h1 = f1 * h0 + (1 - f1) * z1
    z2 = math.tanh(h1 * w + k2 * v2)
    h2 = f2 * h1 + (1 - f2) * z2
    # backward, step 2: the final-state cotangent is clamped, then the readout term is added
    g2 = q2 * a2 + cl(b)
    dp2 = (1 - f2) * g2 * (1 - z2**2)
    # backward, step 1: the cotangent arriving from step 2 is clamped, dh0 is not
    r1 = f2 * g2 + dp2 * w
    g1 = q1 * a1 + cl(r1)
    dp1 = (1 - f1) * g1 * (1 - z1**2)
    grads = dict(
        q=[h1 * a1, h2 * a2],
        k=[dp1 * v1, dp2 * v2],
        v=[dp1 * k1, dp2 * k2],
        f=[g1 * (h0 - z1), g2 * (h1 - z2)],
        W=h0 * dp1 + h1 * dp2,
        h0=f1 * g1 + dp1 * w,
    )
    inputs = dict(q=[q1, q2], k=[k1, k2], v=[v1, v2], f=[f1, f2], W=w, h0=h0)
    return inputs, (q1 * h1, q2 * h2, h2), (a1, a2, b), grads


@pytest.mark.parametrize("clip", [None, 0.5, -0.5], ids=["no-clip", "clip", "negative-clip"])
def test_hand_derived_single_head(clip):
    inputs, (y1, y2, h2), (a1, a2, b), expected = _hand_case(None if clip is None else abs(clip))
    shapes = dict(q=(1, 2, 1, 1), k=(1, 2, 1, 1), v=(1, 2, 1, 1), f=(1, 2, 1), W=(1, 1, 1), h0=(1, 1, 1, 1))
    tensors = {
        name: torch.tensor(inputs[name], dtype=torch.float64).reshape(shape).requires_grad_()
        for name, shape in shapes.items()
    }
    y, h = m2rnn_torch(**tensors, gradient_clipping=clip)
    np.testing.assert_allclose(y.detach().flatten().numpy(), [y1, y2], rtol=1e-14)
    np.testing.assert_allclose(h.item(), h2, rtol=1e-14)
    loss = a1 * y[0, 0, 0, 0] + a2 * y[0, 1, 0, 0] + b * h[0, 0, 0, 0]
    loss.backward()
    for name, value in expected.items():
        np.testing.assert_allclose(tensors[name].grad.flatten().numpy(), np.ravel(value), rtol=1e-13)
    if clip is not None:  # the case is built so that the clamp binds at both steps but not on dh0
        _, _, _, unclipped = _hand_case(None)
        assert abs(expected["h0"]) > abs(clip)
        for name in ("k", "v", "f", "W", "h0"):  # dq reads the forward state only
            assert not np.allclose(np.ravel(expected[name]), np.ravel(unclipped[name]), rtol=1e-3), name


def test_bad_head_counts_raise():
    arrays = _torch(numpy_m2rnn_inputs(5, batch=1, seq_len=2, counts=(2, 2, 3, 3, 3), k_dim=2, v_dim=2))
    arrays["h0"] = None
    with pytest.raises(ValueError, match="divide N=3"):
        m2rnn_torch(**arrays)


def test_missing_torch_gives_install_hint(monkeypatch):
    """Imported without torch, the module raises an ImportError that names the extra to install."""
    import m2rnn_jax.interop.torch_reference as module

    monkeypatch.setitem(sys.modules, "torch", None)
    spec = importlib.util.spec_from_file_location("_torch_reference_without_torch", module.__file__)
    with pytest.raises(ImportError, match=r"pip install m2rnn-jax\[torch\]"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_lazy_package_exports():
    import m2rnn_jax.interop as interop

    assert interop.m2rnn_torch is m2rnn_torch
    assert callable(interop.compare_layer_with_torch) and callable(interop.flax_params_from_torch_state_dict)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        interop.nope  # noqa: B018
