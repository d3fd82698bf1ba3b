"""The JAX scan reference (``m2rnn(..., backend="scan")``) against the independent PyTorch op.

Forward outputs and the gradients of q, k, v, W, f, h0 (random cotangents on both y and h_final) must agree to
a relative error (max |a - b| / max |b|) below 1e-10 in float64 and 1e-5 in float32.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from m2rnn_jax import m2rnn  # noqa: E402
from m2rnn_jax.interop.conversion import to_torch  # noqa: E402
from m2rnn_jax.interop.torch_reference import m2rnn_torch  # noqa: E402
from m2rnn_jax.testing import M2RNN_DIFFERENTIABLE as DIFFERENTIABLE  # noqa: E402
from m2rnn_jax.testing import max_relative_error, op_values_and_grads  # noqa: E402
from tests.interop.inputs import numpy_m2rnn_inputs, numpy_varlen_inputs  # noqa: E402

TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def jax_outputs_and_grads(inputs, cotangents, clip):
    """(y, h_final) and the gradients of <y, dy> + <h_final, dh> w.r.t. every differentiable input."""
    run = functools.partial(m2rnn, gradient_clipping=clip, backend="scan")
    outputs, grads, _ = op_values_and_grads(run, inputs, cotangents)
    return outputs, grads


def torch_outputs_and_grads(inputs, cotangents, clip):
    names = [n for n in DIFFERENTIABLE if n in inputs]
    tensors = {n: to_torch(inputs[n]).requires_grad_() for n in names}
    cu_seqlens = to_torch(inputs["cu_seqlens"]) if "cu_seqlens" in inputs else None
    outputs = m2rnn_torch(**tensors, cu_seqlens=cu_seqlens, gradient_clipping=clip)
    grads = torch.autograd.grad(outputs, [tensors[n] for n in names], [to_torch(c) for c in cotangents])
    return [o.detach() for o in outputs], dict(zip(names, (g.numpy() for g in grads)))


def random_cotangents(seed, inputs, dtype):
    """NumPy-drawn cotangents for y (.., N, V) and h_final (B, N, K, V), as JAX arrays of ``dtype``."""
    q, v = inputs["q"], inputs["v"]
    num_heads = max(q.shape[-2], inputs["k"].shape[-2], v.shape[-2], inputs["f"].shape[-1], inputs["W"].shape[0])
    batch = q.shape[0] if "cu_seqlens" not in inputs else inputs["cu_seqlens"].shape[0] - 1
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(q.shape[:-2] + (num_heads, v.shape[-1]))
    dh = rng.standard_normal((batch, num_heads, q.shape[-1], v.shape[-1]))
    return jnp.asarray(dy, dtype), jnp.asarray(dh, dtype)


def assert_parity(inputs, dtype, clip=None, seed=1):
    cotangents = random_cotangents(seed, inputs, dtype)
    (y, h), grads = jax_outputs_and_grads(inputs, cotangents, clip)
    (y_t, h_t), grads_t = torch_outputs_and_grads(inputs, cotangents, clip)
    assert y.dtype == dtype and h.dtype == dtype
    errors = {"y": max_relative_error(y, y_t.numpy()), "h_final": max_relative_error(h, h_t.numpy())}
    errors.update({f"d{n}": max_relative_error(grads[n], grads_t[n]) for n in grads})
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype]}
    assert not bad, f"relative errors over {TOLERANCE[dtype]:g}: {bad}"
    return grads


def inputs_for(dtype, *, seed=0, cu_seqlens=None, **kwargs):
    """NumPy-drawn realistic inputs (see tests/interop/inputs.py) as JAX arrays of ``dtype``."""
    if cu_seqlens is None:
        arrays = numpy_m2rnn_inputs(seed, **kwargs)
    else:
        arrays = numpy_varlen_inputs(seed, cu_seqlens=cu_seqlens, **kwargs)
    return {name: jnp.asarray(x, dtype=x.dtype if name == "cu_seqlens" else dtype) for name, x in arrays.items()}


DTYPES = [pytest.param(jnp.float64, id="f64"), pytest.param(jnp.float32, id="f32")]
HEAD_PATTERNS = [  # (counts (Nq, Nk, Nv, Nf, Nw) and sizes, gradient_clipping)
    pytest.param(dict(counts=(1, 1, 84, 84, 84), k_dim=64, v_dim=16), 1.0, id="paper-Nq=Nk=1-N84"),
    pytest.param(dict(counts=(2, 4, 8, 8, 2), k_dim=5, v_dim=3), 0.05, id="mixed-2-4-8-8-2-binding-clip"),
    pytest.param(dict(counts=(3, 3, 3, 3, 3), k_dim=4, v_dim=6), None, id="equal-3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,clip", HEAD_PATTERNS)
def test_dense_parity(x64, dtype, heads, clip):
    seq_len = 3 if max(heads["counts"]) == 84 else 6
    assert_parity(inputs_for(dtype, batch=2, seq_len=seq_len, **heads), dtype, clip=clip)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_parity_without_h0(x64, dtype):
    inputs = inputs_for(dtype, batch=2, seq_len=5, counts=(1, 4, 4, 4, 4), k_dim=3, v_dim=4, with_h0=False)
    assert "h0" not in inputs
    assert_parity(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_parity(x64, dtype):
    inputs = inputs_for(dtype, counts=(4, 2, 4, 4, 4), k_dim=3, v_dim=2, cu_seqlens=[0, 3, 3, 8, 9])
    assert_parity(inputs, dtype, clip=0.5)


def test_clipping_that_binds(x64):
    """With a bound small enough to bind, both implementations agree and the gradients really change."""
    inputs = inputs_for(jnp.float64, batch=2, seq_len=6, counts=(2, 4, 4, 4, 4), k_dim=3, v_dim=4)
    clipped = assert_parity(inputs, jnp.float64, clip=0.05)
    unclipped = assert_parity(inputs, jnp.float64, clip=None)
    for name in ("k", "v", "W", "f", "h0"):
        assert max_relative_error(clipped[name], unclipped[name]) > 1e-2, name
    assert max_relative_error(clipped["q"], unclipped["q"]) == 0.0  # dq = H_t dy_t reads the forward state only
