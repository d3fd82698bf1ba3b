"""The JAX scan reference (``m2rnn(..., backend="scan")``) against the independent PyTorch op.

Forward outputs and the gradients of q, k, v, W, f, h0 (random cotangents on both y and h_final) must agree to
a relative error (max |a - b| / max |b|) below 1e-10 in float64 and 1e-5 in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from m2rnn_jax import m2rnn  # noqa: E402
from m2rnn_jax.interop.conversion import to_torch  # noqa: E402
from m2rnn_jax.interop.torch_reference import m2rnn_torch  # noqa: E402
from m2rnn_jax.testing import random_m2rnn_inputs  # noqa: E402

TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-5}
DIFFERENTIABLE = ("q", "k", "v", "W", "f", "h0")


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def jax_outputs_and_grads(inputs, cotangents, clip):
    """(y, h_final) and the gradients of <y, dy> + <h_final, dh> w.r.t. every differentiable input."""
    names = [n for n in DIFFERENTIABLE if n in inputs]
    cu_seqlens = inputs.get("cu_seqlens")

    def run(*arrays):
        args = dict(zip(names, arrays))
        return m2rnn(**args, cu_seqlens=cu_seqlens, gradient_clipping=clip, backend="scan")

    @jax.jit  # one compilation instead of many eager ones: keeps the test group inside its time budget
    def outputs_and_grads(arrays, cotangents):
        outputs, vjp = jax.vjp(run, *arrays)
        return outputs, vjp(cotangents)

    outputs, grads = outputs_and_grads([inputs[n] for n in names], cotangents)
    return outputs, dict(zip(names, grads))


def torch_outputs_and_grads(inputs, cotangents, clip):
    names = [n for n in DIFFERENTIABLE if n in inputs]
    tensors = {n: to_torch(inputs[n]).requires_grad_() for n in names}
    cu_seqlens = to_torch(inputs["cu_seqlens"]) if "cu_seqlens" in inputs else None
    outputs = m2rnn_torch(**tensors, cu_seqlens=cu_seqlens, gradient_clipping=clip)
    grads = torch.autograd.grad(outputs, [tensors[n] for n in names], [to_torch(c) for c in cotangents])
    return [o.detach() for o in outputs], dict(zip(names, (g.numpy() for g in grads)))


def random_cotangents(key, inputs, dtype):
    q, v = inputs["q"], inputs["v"]
    lead = q.shape[:-2]
    num_heads = max(q.shape[-2], inputs["k"].shape[-2], v.shape[-2], inputs["f"].shape[-1], inputs["W"].shape[0])
    batch = lead[0] if "cu_seqlens" not in inputs else inputs["cu_seqlens"].shape[0] - 1
    key_y, key_h = jax.random.split(key)
    dy = jax.random.normal(key_y, lead + (num_heads, v.shape[-1]), dtype)
    dh = jax.random.normal(key_h, (batch, num_heads, q.shape[-1], v.shape[-1]), dtype)
    return dy, dh


def assert_parity(inputs, dtype, clip=None, seed=1):
    cotangents = random_cotangents(jax.random.key(seed), inputs, dtype)
    (y, h), grads = jax_outputs_and_grads(inputs, cotangents, clip)
    (y_t, h_t), grads_t = torch_outputs_and_grads(inputs, cotangents, clip)
    assert y.dtype == dtype and h.dtype == dtype
    errors = {"y": relative_error(y, y_t.numpy()), "h_final": relative_error(h, h_t.numpy())}
    errors.update({f"d{n}": relative_error(grads[n], grads_t[n]) for n in grads})
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype]}
    assert not bad, f"relative errors over {TOLERANCE[dtype]:g}: {bad}"
    return grads


def inputs_for(dtype, *, seed=0, **kwargs):
    return random_m2rnn_inputs(jax.random.key(seed), dtype=dtype, **kwargs)


DTYPES = [pytest.param(jnp.float64, id="f64"), pytest.param(jnp.float32, id="f32")]
HEAD_PATTERNS = [
    pytest.param(dict(num_heads=84, k_dim=64, v_dim=16, num_q_heads=1, num_k_heads=1), id="paper-Nq=Nk=1-N84"),
    pytest.param(
        dict(num_heads=8, k_dim=5, v_dim=3, num_q_heads=2, num_k_heads=4, num_f_heads=8, num_w_heads=2),
        id="mixed-2-4-8-8-2",
    ),
    pytest.param(dict(num_heads=3, k_dim=4, v_dim=6), id="equal-3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEAD_PATTERNS)
def test_dense_parity(x64, dtype, heads):
    seq_len = 3 if heads["num_heads"] == 84 else 6
    assert_parity(inputs_for(dtype, batch=2, seq_len=seq_len, **heads), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_parity_without_h0(x64, dtype):
    inputs = inputs_for(dtype, batch=2, seq_len=5, num_heads=4, k_dim=3, v_dim=4, num_q_heads=1, with_h0=False)
    assert "h0" not in inputs
    assert_parity(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_parity(x64, dtype):
    inputs = inputs_for(
        dtype, batch=0, seq_len=0, num_heads=4, k_dim=3, v_dim=2, num_k_heads=2, cu_seqlens=[0, 3, 3, 8, 9]
    )
    assert_parity(inputs, dtype, clip=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_equals_separate_dense_runs(x64, dtype):
    """The JAX varlen op on packed tokens equals the torch op run on each sequence separately."""
    bounds = [0, 4, 5, 9]
    inputs = inputs_for(dtype, batch=0, seq_len=0, num_heads=2, k_dim=3, v_dim=2, num_q_heads=1, cu_seqlens=bounds)
    y, h = m2rnn(**inputs, backend="scan")
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = {n: to_torch(inputs[n][start:end])[None] for n in ("q", "k", "v", "f")}
        y_b, h_b = m2rnn_torch(**piece, W=to_torch(inputs["W"]), h0=to_torch(inputs["h0"][b : b + 1]))
        assert relative_error(y[start:end], y_b[0].numpy()) < TOLERANCE[dtype]
        assert relative_error(h[b], h_b[0].numpy()) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipping_that_binds(x64, dtype):
    """With a bound small enough to bind, both implementations agree and the gradients really change."""
    inputs = inputs_for(dtype, batch=2, seq_len=6, num_heads=4, k_dim=3, v_dim=4, num_q_heads=2)
    clipped = assert_parity(inputs, dtype, clip=0.05)
    unclipped = assert_parity(inputs, dtype, clip=None)
    for name in ("k", "v", "W", "f", "h0"):
        assert relative_error(clipped[name], unclipped[name]) > 1e-2, name
    assert relative_error(clipped["q"], unclipped["q"]) == 0.0  # dq = H_t dy_t reads the forward state only


def test_clipping_that_does_not_bind_is_identity(x64):
    inputs = inputs_for(jnp.float64, batch=1, seq_len=4, num_heads=2, k_dim=2, v_dim=3)
    clipped = assert_parity(inputs, jnp.float64, clip=1e6)
    unclipped = assert_parity(inputs, jnp.float64, clip=None)
    for name in DIFFERENTIABLE:
        np.testing.assert_array_equal(clipped[name], unclipped[name])
