"""tanh's 2 log2(e) folded into W and k (``KernelConfig.gluon_prescale``), checked on CPU: the prescaled tanh forms
drop their leading multiply, a NumPy emulation of their per-thread float32 math on u = 2 log2(e) x matches tanh(x),
and the bf16 hi + lo pair of 2 log2(e) W reproduces the scaled pre-activation to float32 accuracy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu.m2rnn_gluon_common import TANH_FORMS, TANH_SCALE, prescaled_weights, tanh_constexprs

f32 = np.float32


@pytest.mark.parametrize("form", sorted(TANH_FORMS))
def test_prescaled_forms_drop_the_scale(form):
    plain, scaled = tanh_constexprs(form)["TANH_ASM"], tanh_constexprs(form, prescaled=True)["TANH_ASM"]
    assert not tanh_constexprs(form)["PRESCALE"] and tanh_constexprs(form, prescaled=True)["PRESCALE"]
    if form == "approx":
        assert "0f3EB17218" in scaled  # u / (2 log2 e) = u ln(2) / 2
    else:
        assert plain.count("0f4038AA3B") == scaled.count("mov.b32 t,") >= 1 and "0f4038AA3B" not in scaled


def _ex2(u: np.ndarray) -> np.ndarray:
    return np.exp2(u.astype(np.float64)).astype(f32)


def _tanh_rcp(u: np.ndarray) -> np.ndarray:
    """ex2, add, rcp, fma of the "rcp" form on u (float32, rcp correctly rounded)."""
    with np.errstate(over="ignore"):
        d = _ex2(u) + f32(1)
        return f32(1) - f32(2) * (f32(1) / d)


def _tanh_newton(u: np.ndarray) -> np.ndarray:
    """The "newton" form on u: min 64, ex2, integer-seeded reciprocal, three Newton steps, 1 - 2 r."""
    d = _ex2(np.minimum(u, f32(64))) + f32(1)
    r = (np.int32(0x7EF311C3) - d.view(np.int32)).view(f32)
    for _ in range(3):
        e = np.float32(1) - d * r
        r = r * e + r
    return f32(1) - f32(2) * r


@pytest.mark.parametrize("tanh", [_tanh_rcp, _tanh_newton])
def test_emulated_prescaled_tanh_matches_tanh(tanh):
    x = np.concatenate([np.linspace(-30, 30, 200001), [-1e4, 1e4, 0.0]]).astype(f32)
    u = (x.astype(np.float64) * TANH_SCALE).astype(f32)  # what the scaled mma delivers, rounded to float32
    assert np.max(np.abs(tanh(u) - np.tanh(x.astype(np.float64)))) < 1e-6


def test_hi_lo_pair_reproduces_the_scaled_preactivation():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 16, 16)) / 4, jnp.bfloat16)
    pair = np.asarray(prescaled_weights(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    assert pair.shape == (2, 3, 16, 16)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    assert np.max(np.abs(pair[0] + pair[1] - TANH_SCALE * w64)) <= 2.0**-16 * np.max(np.abs(TANH_SCALE * w64))
    h = np.asarray(jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16).astype(jnp.float32), np.float64)
    k, v = rng.normal(size=32), rng.normal(size=16)
    scaled = h @ pair[0, 0] + h @ pair[1, 0] + np.outer(k * TANH_SCALE, v)  # what the two mma compute
    exact = TANH_SCALE * (h @ w64[0] + np.outer(k, v))
    assert np.max(np.abs(scaled - exact)) < 1e-4 * np.max(np.abs(exact))
