"""The SSD op (Mamba2's recurrence): chunked form vs the step-by-step reference (values and every gradient),
the op's backend choice, output dtypes and argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops import ssd
from m2rnn_jax.ops.ssd import ssd_chunked, ssd_recurrent


def make_inputs(seed: int, dtype=jnp.float64, b=2, S=13, H=4, P=3, G=2, N=5):
    """x (b, S, H, P), dt and log_decay (b, S, H), B and C (b, S, G, N), h0 (b, H, P, N)."""
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.01, 1.0, (b, S, H))
    arrays = (
        rng.standard_normal((b, S, H, P)),
        dt,
        dt * -rng.uniform(0.1, 4.0, (H,)),
        rng.standard_normal((b, S, G, N)),
        rng.standard_normal((b, S, G, N)),
        rng.standard_normal((b, H, P, N)),
    )
    return tuple(jnp.asarray(a, dtype) for a in arrays)


@pytest.mark.parametrize("chunk_size", [1, 4, 32])
def test_chunked_form_matches_recurrent_form_and_its_gradients(x64, chunk_size):
    inputs = make_inputs(chunk_size)
    weights = jnp.asarray(np.random.default_rng(99).standard_normal(inputs[0].shape))

    def loss(backend, *args):
        y, final = ssd(*args, chunk_size=chunk_size, backend=backend)
        return jnp.sum(y * weights) + jnp.sum(final**2)

    y_rec, s_rec = jax.jit(ssd_recurrent)(*inputs)
    y_chk, s_chk = jax.jit(lambda *a: ssd_chunked(*a, chunk_size))(*inputs)
    np.testing.assert_allclose(y_chk, y_rec, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s_chk, s_rec, rtol=1e-10, atol=1e-12)
    argnums = tuple(range(6))
    g_rec = jax.jit(jax.grad(lambda *a: loss("recurrent", *a), argnums))(*inputs)
    g_chk = jax.jit(jax.grad(lambda *a: loss("chunked", *a), argnums))(*inputs)
    for a, b in zip(g_chk, g_rec):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_auto_is_recurrent_for_one_step_and_chunked_otherwise(x64):
    """One step: auto == recurrent; h0 None == zeros; the reset zeroes the state entering its step."""
    x, dt, log_decay, B, C, h0 = make_inputs(1, S=1)
    y, final = ssd(x, dt, log_decay, B, C, h0)
    y_ref, final_ref = ssd_recurrent(x, dt, log_decay, B, C, h0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(final, final_ref, rtol=1e-12)
    reset = jnp.ones((2, 1), bool)
    np.testing.assert_allclose(ssd(x, dt, log_decay, B, C, h0, reset=reset)[0], ssd(x, dt, log_decay, B, C)[0])
    inputs = make_inputs(2)
    y, _ = ssd(*inputs, chunk_size=4)
    np.testing.assert_allclose(y, ssd_chunked(*inputs, 4)[0], rtol=1e-12)


def test_output_dtypes():
    """y in x's dtype, the final state in float32 for bfloat16 inputs (the forms compute in float32)."""
    inputs = make_inputs(3, dtype=jnp.bfloat16)
    y, final = ssd(*inputs[:5], chunk_size=4)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    y32, _ = ssd(*(t.astype(jnp.float32) for t in inputs[:5]), chunk_size=4)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.05)


def _bad(argument: str):
    x, dt, log_decay, B, C, h0 = make_inputs(4, dtype=jnp.float32, S=3)
    kwargs = dict(x=x, dt=dt, log_decay=log_decay, B=B, C=C, h0=h0, reset=None, chunk_size=4, backend="auto")
    kwargs.update(
        {
            "x": dict(x=x[0]),
            "dt": dict(dt=dt[:, :2]),
            "log_decay": dict(log_decay=log_decay.astype(jnp.int32)),
            "B": dict(B=B[:, :, :1].repeat(3, axis=2)),
            "C": dict(C=C[..., :4]),
            "h0": dict(h0=h0[:, :, :2]),
            "reset": dict(reset=jnp.zeros((2, 3), jnp.int32)),
            "chunk_size": dict(chunk_size=0),
            "backend": dict(backend="pallas_gpu"),
        }[argument]
    )
    return kwargs


@pytest.mark.parametrize("argument", ["x", "dt", "log_decay", "B", "C", "h0", "reset", "chunk_size", "backend"])
def test_bad_arguments_name_the_argument(argument):
    kwargs = _bad(argument)
    with pytest.raises(ValueError, match=rf"^{argument}: expected "):
        ssd(kwargs.pop("x"), kwargs.pop("dt"), kwargs.pop("log_decay"), kwargs.pop("B"), kwargs.pop("C"), **kwargs)
