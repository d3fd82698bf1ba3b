"""The Gated DeltaNet layer's hand-written backwards. `gated_rms_norm`: the forward is `RMSNorm(o * silu(gate))`
(same values) and the backward equals autodiff of that composition for o, gate and scale (float64 to 1e-12, float32
to 1e-5, bf16 inputs with a float32 scale within bf16 rounding), and it recomputes the product behind an
optimization barrier; bad shapes and eps are refused. `l2_normalize`: the same values as the former float32 formula
and its autodiff gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.layers.gated_deltanet import l2_normalize
from m2rnn_jax.layers.gated_norm import gated_rms_norm
from m2rnn_jax.testing import jaxpr_equations, relative_error

EPS = 1e-5


def composition(o, gate, scale, dtype):
    """The layer's former path: o in float32 times silu(gate), then RMSNorm (statistics in float32)."""
    compute = jnp.promote_types(jnp.float32, o.dtype)
    g = o.astype(compute) * jax.nn.silu(gate.astype(compute))
    inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + EPS)
    return (g * inverse_rms * scale.astype(compute)).astype(dtype)


def _inputs(dtype, shape=(2, 5, 3, 16)):
    keys = jax.random.split(jax.random.key(0), 4)
    o = jax.random.normal(keys[0], shape, dtype)
    gate = 2.0 * jax.random.normal(keys[1], shape, dtype)
    scale = (1.0 + 0.1 * jax.random.normal(keys[2], shape[-1:])).astype(jnp.promote_types(jnp.float32, dtype))
    cotangent = jax.random.normal(keys[3], shape, dtype)
    return o, gate, scale, cotangent


def _values_and_grads(fn, o, gate, scale, cotangent, dtype):
    y, pullback = jax.vjp(lambda o, g, s: fn(o, g, s, dtype), o, gate, scale)
    return (y, *pullback(cotangent))


def ours(o, gate, scale, dtype):
    return gated_rms_norm(o, gate, scale, eps=EPS, dtype=dtype)


def _check_against_autodiff(dtype, tolerance):
    o, gate, scale, cotangent = _inputs(dtype)
    fast = _values_and_grads(ours, o, gate, scale, cotangent, dtype)
    reference = _values_and_grads(composition, o, gate, scale, cotangent, dtype)
    for name, a, b in zip(("y", "d o", "d gate", "d scale"), fast, reference):
        assert a.dtype == b.dtype == (dtype if name != "d scale" else scale.dtype), name
        assert relative_error(a, b) < tolerance, (name, relative_error(a, b))


def test_matches_autodiff_of_the_composition_float64(x64):
    _check_against_autodiff(jnp.float64, 1e-12)


def test_matches_autodiff_of_the_composition_float32():
    _check_against_autodiff(jnp.float32, 1e-5)


def test_bf16_inputs_forward_identical_gradients_within_rounding():
    o, gate, scale, cotangent = _inputs(jnp.bfloat16)
    fast = jax.jit(lambda *a: _values_and_grads(ours, *a, jnp.bfloat16))(o, gate, scale, cotangent)
    reference = jax.jit(lambda *a: _values_and_grads(composition, *a, jnp.bfloat16))(o, gate, scale, cotangent)
    np.testing.assert_array_equal(np.asarray(fast[0], np.float32), np.asarray(reference[0], np.float32))
    assert [a.dtype for a in fast[1:]] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for a, b in zip(fast[1:], reference[1:]):
        assert relative_error(a.astype(jnp.float32), b.astype(jnp.float32)) < 1e-2


def test_backward_recomputes_the_product_behind_a_barrier():
    """The backward recomputes o * silu(gate) from its bf16 inputs behind an optimization barrier: without it XLA
    merges the recomputation with the forward's float32 product and keeps that array alive until the backward."""
    o, gate, scale, cotangent = _inputs(jnp.bfloat16)
    backward = jax.vjp(lambda o, g: gated_rms_norm(o, g, scale, eps=EPS, dtype=jnp.bfloat16), o, gate)[1]
    jaxpr = jax.make_jaxpr(backward)(cotangent)
    barriers = jaxpr_equations(jaxpr.jaxpr, "optimization_barrier")
    assert [[v.aval.dtype for v in e.invars] for e in barriers] == [[jnp.bfloat16, jnp.bfloat16]]


def test_refuses_bad_arguments():
    o, gate, scale, _ = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="gate: expected shape"):
        gated_rms_norm(o, gate[..., :8], scale, eps=EPS, dtype=jnp.float32)
    with pytest.raises(ValueError, match="scale: expected shape"):
        gated_rms_norm(o, gate, scale[:8], eps=EPS, dtype=jnp.float32)
    with pytest.raises(ValueError, match="eps: expected > 0"):
        gated_rms_norm(o, gate, scale, eps=0.0, dtype=jnp.float32)


def l2_composition(x, scale, dtype):
    """The layer's former path: x in float32, divided by its norm, scaled, cast."""
    x = x.astype(jnp.promote_types(jnp.float32, x.dtype))
    return (x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-6) * scale).astype(dtype)


def _l2_check(dtype, tolerance, scale=0.0625):
    x, _, _, cotangent = _inputs(dtype)
    fast = jax.vjp(lambda x: l2_normalize(x, scale, dtype), x)
    reference = jax.vjp(lambda x: l2_composition(x, scale, dtype), x)
    (d_fast,), (d_reference,) = fast[1](cotangent), reference[1](cotangent)
    np.testing.assert_array_equal(np.asarray(fast[0], np.float64), np.asarray(reference[0], np.float64))
    assert d_fast.dtype == d_reference.dtype == dtype
    error = relative_error(d_fast.astype(jnp.float32), d_reference.astype(jnp.float32))
    assert error < tolerance, error


def test_l2_normalize_matches_autodiff_float64(x64):
    _l2_check(jnp.float64, 1e-12)


def test_l2_normalize_matches_autodiff_float32_and_bf16():
    _l2_check(jnp.float32, 1e-5)
    _l2_check(jnp.bfloat16, 1e-2, scale=1.0)
