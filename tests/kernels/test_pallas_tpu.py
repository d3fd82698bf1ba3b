"""The TPU kernels (backend "pallas_tpu") in TPU interpret mode on CPU, against the ``lax.scan`` reference.

Every kernel case runs forward and backward once through ``jax.vjp`` with random cotangents for y and h_final and
compares y, h_final and all input gradients. The interpreter simulates TPU memory and DMAs with race detection on
(``pltpu.InterpretParams(detect_races=True)``; some cases simulate two cores splitting the parallel grid axes), and
uninitialised VMEM reads return NaN. Shapes are tiny but cover several chunks, ragged lengths, K and V that need
padding, several head blocks, blocks whose heads read two q/k source heads, varlen with empty sequences, and a
binding gradient clip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from m2rnn_jax import m2rnn
from m2rnn_jax.ops.m2rnn.backends import get_backend, resolve_backend_name
from m2rnn_jax.ops.m2rnn.pallas_tpu import m2rnn_pallas_tpu
from m2rnn_jax.testing import max_relative_error, op_values_and_grads, random_m2rnn_inputs
from pallas_kernels.tpu import m2rnn_layout as layout
from pallas_kernels.tpu.m2rnn_backward import backward_buffers
from pallas_kernels.tpu.m2rnn_common import vmem_bytes
from pallas_kernels.tpu.m2rnn_forward import forward_buffers

try:  # the race flag lives in a private module; the printed "RACE DETECTED" is checked as well
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _interpret_state
except ImportError:  # pragma: no cover - depends on the jax version
    _interpret_state = None


@pytest.fixture
def interpret(capfd):
    """TPU interpret parameters with race detection; fails the test if the detector reported a race."""
    pltpu.reset_tpu_interpret_mode_state()
    yield pltpu.InterpretParams(detect_races=True)
    assert "RACE DETECTED" not in capfd.readouterr().out
    if _interpret_state is not None and _interpret_state.races is not None:
        assert not _interpret_state.races.races_found


def _assert_close(name, actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), name
    error = max_relative_error(actual, expected, floor=1.0)
    assert error <= tol, f"{name}: relative max error {error:.2e} > {tol:.1e}"


def _compare(inputs, *, interpret, clip=None, state_dtype=jnp.float32, chunk_size=8, tol=2e-5, grad_tol=None):
    options = dict(h0=None, cu_seqlens=None, gradient_clipping=clip, state_dtype=state_dtype)  # inputs override
    kernel = functools.partial(m2rnn_pallas_tpu, interpret=interpret, chunk_size=chunk_size, **options)
    reference = functools.partial(m2rnn, backend="scan", **options)
    key = jax.random.key(7)
    (y, final), grads, _ = op_values_and_grads(kernel, inputs, key=key)
    (y_ref, final_ref), grads_ref, _ = op_values_and_grads(reference, inputs, key=key)
    _assert_close("y", y, y_ref, tol)
    _assert_close("h_final", final, final_ref, tol)
    for name in grads_ref:
        assert grads[name].dtype == inputs[name].dtype, name
        _assert_close("d" + name, grads[name], grads_ref[name], grad_tol or tol)
    return grads_ref


def test_dense_shared_qk_padding_and_binding_clip(interpret):
    """Nq = Nk = 1 (the paper), K = 5 and V = 3 padded, S = 13 over two chunks of 8, h0 given, clip binding."""
    inputs = random_m2rnn_inputs(
        jax.random.key(0), batch=2, seq_len=13, num_heads=4, k_dim=5, v_dim=3, num_q_heads=1, num_k_heads=1
    )
    clipped = _compare(inputs, interpret=interpret, clip=0.05)
    _, unclipped, _ = op_values_and_grads(functools.partial(m2rnn, backend="scan"), inputs, key=jax.random.key(7))
    for name in ("k", "v", "W", "f", "h0"):  # the clip changes every gradient that flows through the state
        assert not np.allclose(clipped[name], unclipped[name], rtol=1e-2, atol=1e-3), name


def test_dense_mixed_heads_several_blocks_two_cores(capfd):
    """N = 4 heads of V = 64 (two per 128-lane block, so 2 head blocks), Nq = 2, Nk = 4, Nv = 2, Nf = 1, Nw = 4,
    h0 None, one chunk; the interpreter splits the parallel grid axes over two simulated cores."""
    pltpu.reset_tpu_interpret_mode_state()
    inputs = random_m2rnn_inputs(
        jax.random.key(1),
        batch=2,
        seq_len=7,
        num_heads=4,
        k_dim=8,
        v_dim=64,
        num_q_heads=2,
        num_k_heads=4,
        num_v_heads=2,
        num_f_heads=1,
        with_h0=False,
    )
    _compare(inputs, interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2), chunk_size=8)
    assert "RACE DETECTED" not in capfd.readouterr().out
    if _interpret_state is not None and _interpret_state.races is not None:
        assert not _interpret_state.races.races_found


def test_dense_blocks_straddling_two_source_heads(interpret):
    """N = 6 heads of V = 32 with hb = 4 heads per block: block 0 holds heads 0-3 and Nq = Nk = 3 (two heads per
    source), so block 0 reads sources 0-1 and block 1 reads source 1 too; the partial dq/dk are summed outside."""
    inputs = random_m2rnn_inputs(
        jax.random.key(2), batch=1, seq_len=9, num_heads=6, k_dim=4, v_dim=32, num_q_heads=3, num_k_heads=3
    )
    plan = layout.plan_blocks(1, 9, 6, 4, 32, 8)
    np.testing.assert_array_equal(layout.source_slots(plan, 3), [[0, 1], [2, -1]])
    _compare(inputs, interpret=interpret, clip=0.5)


def test_varlen_empty_sequence_boundaries_inside_chunks_and_clip(interpret):
    """Four packed sequences (one empty) whose boundaries fall inside chunks of 8, per-sequence h0, clip binding."""
    inputs = random_m2rnn_inputs(
        jax.random.key(3),
        batch=0,
        seq_len=0,
        num_heads=2,
        k_dim=5,
        v_dim=4,
        num_q_heads=1,
        cu_seqlens=[0, 5, 5, 14, 21],
    )
    _compare(inputs, interpret=interpret, clip=0.1)


def test_varlen_without_h0(interpret):
    inputs = random_m2rnn_inputs(
        jax.random.key(4), batch=0, seq_len=0, num_heads=3, k_dim=3, v_dim=5, cu_seqlens=[0, 6, 11], with_h0=False
    )
    _compare(inputs, interpret=interpret)


def test_bf16_inputs_float32_state(interpret):
    """bf16 q, k, v, f, W, h0 with the float32 state: y and the gradients agree to bf16 output rounding."""
    inputs = random_m2rnn_inputs(
        jax.random.key(5), batch=1, seq_len=9, num_heads=2, k_dim=8, v_dim=8, num_q_heads=1, dtype=jnp.bfloat16
    )
    _compare(inputs, interpret=interpret, clip=1.0, tol=2e-2)


def test_bf16_state_rounds_like_the_reference(interpret):
    """state_dtype=bfloat16 with bf16 inputs: the forward rounds the state each step exactly like the reference; the
    backward treats the rounding as the identity (the reference rounds cotangents too), hence the looser bound."""
    inputs = random_m2rnn_inputs(
        jax.random.key(6), batch=1, seq_len=10, num_heads=2, k_dim=4, v_dim=4, dtype=jnp.bfloat16
    )
    _compare(inputs, interpret=interpret, state_dtype=jnp.bfloat16, tol=2e-2, grad_tol=6e-2)


def test_public_op_runs_the_kernels_in_interpret_mode(interpret):
    """m2rnn(..., backend="pallas_tpu", interpret=...) goes through the registered backend (default chunk)."""
    x = random_m2rnn_inputs(jax.random.key(8), batch=1, seq_len=9, num_heads=2, k_dim=4, v_dim=4, num_q_heads=1)
    y, final = m2rnn(**x, backend="pallas_tpu", interpret=interpret)
    y_ref, final_ref = m2rnn(**x, backend="scan")
    _assert_close("y", y, y_ref, 2e-5)
    _assert_close("h_final", final, final_ref, 2e-5)
    assert get_backend("pallas_tpu") is m2rnn_pallas_tpu


def test_auto_selects_the_tpu_kernels_on_tpu(monkeypatch):
    from m2rnn_jax.ops.m2rnn import backends

    monkeypatch.setattr(backends, "_platform", lambda: "tpu")
    assert resolve_backend_name("auto") == "pallas_tpu"


def test_float64_and_bad_chunk_size_are_refused(x64):
    x = random_m2rnn_inputs(jax.random.key(9), batch=1, seq_len=4, num_heads=1, k_dim=2, v_dim=2, dtype=jnp.float64)
    with pytest.raises(ValueError, match="float32"):
        m2rnn(**x, backend="pallas_tpu", interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        layout.plan_blocks(1, 4, 1, 2, 2, chunk_size=12)


def test_packing_round_trips_and_block_diagonal_weight():
    key = jax.random.split(jax.random.key(10), 3)
    plan = layout.plan_blocks(2, 11, 5, 6, 3, 8)  # Vp = 4, hb = 5, Kp = 8, 16 time steps
    x = jax.random.normal(key[0], (2, 11, 5, 3), jnp.float32)
    h = jax.random.normal(key[1], (2, 5, 6, 3), jnp.float32)
    w = jax.random.normal(key[2], (5, 3, 3), jnp.float32)
    assert (plan.v_pad, plan.heads_per_block, plan.lanes, plan.k_pad, plan.tokens_pad) == (4, 5, 20, 8, 16)
    np.testing.assert_array_equal(layout.unpack_lanes(layout.pack_lanes(x, plan), plan), x)
    np.testing.assert_array_equal(layout.unpack_state(layout.pack_state(h, plan), plan), h)
    packed_w = layout.pack_weight(w, plan)[0]
    np.testing.assert_array_equal(packed_w[4:7, 4:7], w[1])
    assert float(jnp.abs(packed_w[0:4, 4:8]).max()) == 0.0
    np.testing.assert_array_equal(layout.unpack_weight_grad(packed_w[None], plan), w)


def test_vmem_budget_of_the_paper_layer_blocks():
    """Tile-padded VMEM of the default blocks (C = 64) for K = 64, V = 16, Nq = Nk = 1, bf16: the docs/tpu.md numbers.

    Forward: 2 x (q, k 64x(16x128) bf16 tiles + q_src, k_src + v, f, W, y, checkpoint) = 1,392,640 B pipelined, plus
    655,360 B scratch. Backward adds dq, dk, dv, df, dW blocks and the (C, Kp, L) states and tanh outputs.
    """
    plan = layout.plan_blocks(8, 4096, 84, 64, 16)
    assert (plan.chunk, plan.heads_per_block, plan.head_blocks, plan.lanes) == (64, 8, 11, 128)
    assert vmem_bytes(*forward_buffers(plan, 1, 1, jnp.bfloat16, True)) == 1_392_640 + 655_360
    assert vmem_bytes(*backward_buffers(plan, 1, 1, jnp.bfloat16)) == 2_703_360 + 4_915_200
