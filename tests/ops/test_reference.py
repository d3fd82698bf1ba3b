"""The lax.scan reference vs the float64 NumPy loop (forward and hand-written BPTT), dtypes, heads, varlen."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2rnn_jax import m2rnn, testing
from m2rnn_jax.testing import M2RNN_DIFFERENTIABLE as ARGS
from m2rnn_jax.testing import op_values_and_grads, random_m2rnn_inputs, relative_error
from tests.ops.numpy_reference import m2rnn_numpy


def scan_value_and_grads(inputs, cotangents, clip=None, **kw):
    """y, h_final and the gradients of <y, dy> + <h_final, dh> w.r.t. every float input (the scan backend)."""
    run = functools.partial(m2rnn, gradient_clipping=clip, backend="scan", **kw)
    (y, h), grads, _ = op_values_and_grads(run, inputs, cotangents)
    return y, h, grads


def random_cotangents(key, inputs):
    """Random cotangents (dy (..., N, V), dh_final (B, N, K, V)) in the dtypes of the op's outputs on ``inputs``."""
    return testing.random_cotangents(key, jax.eval_shape(lambda: m2rnn(**inputs, backend="scan")))


def check_against_numpy(inputs, clip=None, tol=1e-10):
    cot = random_cotangents(jax.random.key(99), inputs)
    y, h, grads = scan_value_and_grads(inputs, cot, clip=clip)
    ref_y, ref_h, ref_grads = m2rnn_numpy(
        *(inputs.get(n) for n in ARGS),
        cu_seqlens=inputs.get("cu_seqlens"),
        dy=np.asarray(cot[0]),
        dh_final=np.asarray(cot[1]),
        clip=clip,
    )
    assert relative_error(y, ref_y) < tol
    assert relative_error(h, ref_h) < tol
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < tol, name
    return grads, ref_grads


HEAD_PATTERNS = [
    # (N, Nq, Nk, Nv, Nf, Nw)
    (4, 4, 4, 4, 4, 4),
    (4, 1, 1, 4, 4, 4),  # the paper's pattern: shared q and k
    (8, 2, 4, 8, 8, 2),  # mixed groupings
    (6, 3, 1, 6, 2, 6),
]


@pytest.mark.parametrize("heads", HEAD_PATTERNS)
@pytest.mark.parametrize("with_h0", [True, False])
def test_float64_matches_numpy_forward_and_gradients(x64, heads, with_h0):
    n, nq, nk, nv, nf, nw = heads
    inputs = random_m2rnn_inputs(
        jax.random.key(1),
        batch=2,
        seq_len=9,
        num_heads=n,
        k_dim=5,
        v_dim=3,
        num_q_heads=nq,
        num_k_heads=nk,
        num_v_heads=nv,
        num_f_heads=nf,
        num_w_heads=nw,
        dtype=jnp.float64,
        with_h0=with_h0,
    )
    check_against_numpy(inputs)


def test_paper_head_pattern_float64(x64):
    """Nq = Nk = 1 shared over N = 84 heads with the paper's K = 64, V = 16."""
    inputs = random_m2rnn_inputs(
        jax.random.key(2),
        batch=1,
        seq_len=4,
        num_heads=84,
        k_dim=64,
        v_dim=16,
        num_q_heads=1,
        num_k_heads=1,
        dtype=jnp.float64,
    )
    check_against_numpy(inputs)


def test_float32_matches_float64_truth():
    inputs = random_m2rnn_inputs(
        jax.random.key(3), batch=2, seq_len=33, num_heads=4, k_dim=8, v_dim=4, num_q_heads=1, num_k_heads=1
    )
    cot = random_cotangents(jax.random.key(4), inputs)
    y, h, grads = scan_value_and_grads(inputs, cot)
    ref_y, ref_h, ref_grads = m2rnn_numpy(
        *(inputs[n] for n in ARGS), dy=np.asarray(cot[0]), dh_final=np.asarray(cot[1])
    )
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert relative_error(y, ref_y) < 1e-5 and relative_error(h, ref_h) < 1e-5
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < 1e-5, name


def test_bfloat16_inputs_error_is_bounded():
    """bf16 inputs, float32 state: the error vs the float64 truth on the same (rounded) inputs stays small."""
    inputs = random_m2rnn_inputs(
        jax.random.key(5),
        batch=2,
        seq_len=64,
        num_heads=4,
        k_dim=16,
        v_dim=8,
        num_q_heads=1,
        num_k_heads=1,
        dtype=jnp.bfloat16,
    )
    y, h = m2rnn(**inputs, backend="scan")
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.bfloat16
    ref_y, ref_h = m2rnn_numpy(*(np.asarray(inputs[n], np.float64) for n in ARGS))
    err_y, err_h = relative_error(y, ref_y), relative_error(h, ref_h)
    print(f"bf16 inputs, f32 state: rel err y {err_y:.2e}, h_final {err_h:.2e}")
    assert err_y < 8e-3 and err_h < 8e-3  # output rounding to bf16 is 2^-9 = 2e-3 per element
    # a bf16 state accumulates rounding over steps: measurably worse than the float32 state
    y16, _ = m2rnn(**inputs, backend="scan", state_dtype=jnp.bfloat16)
    err_y16 = relative_error(y16, ref_y)
    print(f"bf16 inputs, bf16 state: rel err y {err_y16:.2e}")
    assert err_y < err_y16 < 0.1


def test_output_dtypes_follow_contract(x64):
    inputs = random_m2rnn_inputs(jax.random.key(6), batch=1, seq_len=3, num_heads=2, k_dim=2, v_dim=2)
    inputs["h0"] = inputs["h0"].astype(jnp.float64)
    y, h = m2rnn(**inputs)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float64
    inputs64 = {n: x.astype(jnp.float64) for n, x in inputs.items()}
    y, h = m2rnn(**{**inputs64, "h0": None})
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64


def test_h0_none_equals_zero_state():
    inputs = random_m2rnn_inputs(jax.random.key(7), batch=2, seq_len=5, num_heads=3, k_dim=4, v_dim=3)
    y0, h0 = m2rnn(**{**inputs, "h0": None})
    y1, h1 = m2rnn(**{**inputs, "h0": jnp.zeros_like(inputs["h0"])})
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(h0, h1)


def test_prefix_then_continuation_equals_full_run():
    """Running S1 steps, then S2 steps from the returned state, equals one run of S1 + S2 steps."""
    inputs = random_m2rnn_inputs(
        jax.random.key(8), batch=2, seq_len=12, num_heads=4, k_dim=4, v_dim=3, num_q_heads=1, num_k_heads=2
    )
    y, h = m2rnn(**inputs)
    first = {n: (x[:, :5] if n in ("q", "k", "v", "f") else x) for n, x in inputs.items()}
    rest = {n: (x[:, 5:] if n in ("q", "k", "v", "f") else x) for n, x in inputs.items()}
    y1, h1 = m2rnn(**first)
    y2, h2 = m2rnn(**{**rest, "h0": h1})
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h2, h, rtol=1e-6, atol=1e-6)


def test_jit_and_state_in_range_from_zero():
    inputs = random_m2rnn_inputs(jax.random.key(9), batch=2, seq_len=40, num_heads=2, k_dim=4, v_dim=4, with_h0=False)
    y, h = jax.jit(lambda a: m2rnn(**a))(inputs)
    assert jnp.all(jnp.abs(h) <= 1.0)  # convex blend of tanh values from H0 = 0 (SPEC §2.1)
    assert jnp.all(jnp.isfinite(y))


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 7),
    n_factor=st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)]),
    k_dim=st.integers(1, 5),
    v_dim=st.integers(1, 4),
    pattern=st.tuples(*[st.booleans()] * 5),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_heads_match_numpy(batch, seq_len, n_factor, k_dim, v_dim, pattern, seed):
    """Random shapes and head patterns: each count is N or N / g for a divisor g; forward and grads vs NumPy."""
    with jax.enable_x64(True):
        base, group = n_factor
        n = base * group
        counts = [base if small else n for small in pattern]
        inputs = random_m2rnn_inputs(
            jax.random.key(seed),
            batch=batch,
            seq_len=seq_len,
            num_heads=n,
            k_dim=k_dim,
            v_dim=v_dim,
            num_q_heads=counts[0],
            num_k_heads=counts[1],
            num_v_heads=counts[2],
            num_f_heads=counts[3],
            num_w_heads=counts[4],
            dtype=jnp.float64,
        )
        if max(counts) < n:  # N is defined as the largest count
            inputs["v"] = jnp.repeat(inputs["v"], n // counts[2], axis=2)
        check_against_numpy(inputs, clip=0.5 if seed % 2 else None)
