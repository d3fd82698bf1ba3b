"""The pallas_gpu backend against the scan reference.

CPU CI runs the real kernels in Pallas interpret mode (tiny shapes, several chunks, ragged last chunks, both
recompute levels, row splits); tests marked ``gpu`` run the compiled kernels on an NVIDIA GPU at the paper shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax import m2rnn
from m2rnn_jax.ops.m2rnn import backends
from m2rnn_jax.ops.m2rnn.pallas_gpu import default_config, m2rnn_pallas_gpu, padded_size
from m2rnn_jax.ops.m2rnn.reference import m2rnn_scan_dense
from m2rnn_jax.ops.m2rnn.scan_backend import scan_backend
from m2rnn_jax.testing import (
    M2RNN_DIFFERENTIABLE,
    max_relative_error,
    op_values_and_grads,
    random_m2rnn_inputs,
    relative_error,
)
from pallas_kernels.gpu.m2rnn_common import KernelConfig
from pallas_kernels.gpu.m2rnn_forward import m2rnn_forward

NAMES = M2RNN_DIFFERENTIABLE
# Max-abs error allowed relative to the reference's max-abs value, per input dtype.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def _outputs_and_grads(fn, inputs, key):
    """y, h_final and the gradients of all float inputs for random cotangents drawn from ``key``, as float32
    NumPy arrays named y, h_final, dq, ...; ``fn`` takes a dict of the inputs named in NAMES."""
    args = {name: inputs[name] for name in NAMES if name in inputs}
    (y, h), grads, _ = op_values_and_grads(lambda **args: fn(args), args, key=key)
    results = {"y": y, "h_final": h} | {"d" + name: g for name, g in grads.items()}
    return {name: np.asarray(x, np.float32) for name, x in results.items()}


def _assert_close(actual, expected, dtype):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert np.isfinite(actual[name]).all(), name
        error = max_relative_error(actual[name], expected[name], floor=1e-6)
        assert error <= TOLERANCE[dtype], f"{name}: max error {error:.3g} of the reference's max value"


def _check_against_scan(inputs, *, dtype, clip=None, state_dtype=jnp.float32, config=None, seed=0):
    cu_seqlens = inputs.get("cu_seqlens")

    def make(backend):
        def fn(args):
            call_args = (args["q"], args["k"], args["v"], args["W"], args["f"], args.get("h0"))
            options = dict(gradient_clipping=clip, state_dtype=jnp.dtype(state_dtype))
            if backend == "scan":
                y, h = scan_backend(*call_args, cu_seqlens=cu_seqlens, interpret=False, **options)
            else:
                y, h = m2rnn_pallas_gpu(*call_args, cu_seqlens=cu_seqlens, interpret=True, config=config, **options)
            final_dtype = args["q"].dtype if args.get("h0") is None else args["h0"].dtype
            return y.astype(args["q"].dtype), h.astype(final_dtype)

        return jax.jit(fn)

    key = jax.random.PRNGKey(seed + 100)
    expected = _outputs_and_grads(make("scan"), inputs, key)
    actual = _outputs_and_grads(make("pallas"), inputs, key)
    _assert_close(actual, expected, dtype)


def test_dense_paper_heads_ragged_chunks_two_level_recompute():
    """Nq = Nk = 1, K and V not powers of two, S = 21 = 2 * 8 + 5 over chunks of 8 recomputed 4 at a time."""
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(0), batch=2, seq_len=21, num_heads=3, k_dim=12, v_dim=9, num_q_heads=1, num_k_heads=1
    )
    _check_against_scan(inputs, dtype=jnp.float32, config=KernelConfig(chunk_size=8, recompute_block=4))


def test_dense_mixed_heads_no_h0_row_split_binding_clip():
    """Mixed head counts, h0 None, K split over two programs, blocks of 3 steps, clipping that binds."""
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(1),
        batch=2,
        seq_len=19,
        num_heads=4,
        k_dim=20,
        v_dim=16,
        num_q_heads=2,
        num_k_heads=1,
        num_f_heads=2,
        num_w_heads=1,
        with_h0=False,
    )
    config = KernelConfig(block_k=16, chunk_size=6, recompute_block=3)
    _check_against_scan(inputs, dtype=jnp.float32, clip=0.02, config=config)


def test_clipping_binds_in_this_setting():
    """Guard for the test above: with c = 0.02 the clamp changes the reference gradients."""
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(1), batch=1, seq_len=12, num_heads=2, k_dim=8, v_dim=8, with_h0=True
    )
    args = {name: inputs[name] for name in NAMES}

    def grad_h0(clip):
        loss = lambda a: scan_backend(
            **a, cu_seqlens=None, gradient_clipping=clip, state_dtype=jnp.float32, interpret=False
        )[0].sum()
        return jax.jit(jax.grad(loss))(args)["h0"]

    assert float(jnp.abs(grad_h0(0.02) - grad_h0(None)).max()) > 1e-3


def test_varlen_with_empty_sequence_h0_and_clip():
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(2),
        batch=0,
        seq_len=0,
        num_heads=2,
        k_dim=16,
        v_dim=12,
        num_q_heads=1,
        num_v_heads=2,
        num_w_heads=1,
        cu_seqlens=[0, 5, 5, 23, 40],
    )
    _check_against_scan(inputs, dtype=jnp.float32, clip=0.5, config=KernelConfig(chunk_size=8, recompute_block=4))


@pytest.mark.parametrize("dtype, split_dot", [(jnp.bfloat16, False), (jnp.float16, True)])
def test_sixteen_bit_inputs(dtype, split_dot):
    """16-bit inputs feed the tensor cores a 16-bit copy of the float32 state (or a hi + lo pair: split_dot)."""
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(3),
        batch=2,
        seq_len=17,
        num_heads=2,
        k_dim=16,
        v_dim=16,
        num_q_heads=1,
        num_k_heads=1,
        dtype=dtype,
    )
    config = KernelConfig(chunk_size=8, recompute_block=4, split_dot=split_dot)
    _check_against_scan(inputs, dtype=dtype, config=config)


def test_bf16_state_storage():
    """state_dtype=bf16 with bf16 inputs rounds the state every step, in the forward and in the recomputation."""
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(4), batch=1, seq_len=12, num_heads=2, k_dim=16, v_dim=16, dtype=jnp.bfloat16
    )
    _check_against_scan(
        inputs, dtype=jnp.bfloat16, state_dtype=jnp.bfloat16, config=KernelConfig(chunk_size=8, recompute_block=4)
    )


def test_k_above_64():
    inputs = random_m2rnn_inputs(jax.random.PRNGKey(5), batch=1, seq_len=6, num_heads=1, k_dim=72, v_dim=8)
    _check_against_scan(inputs, dtype=jnp.float32, config=KernelConfig(chunk_size=4, recompute_block=2))


def test_public_op_dispatch_and_default_config():
    """m2rnn(..., backend="pallas_gpu", interpret=True) runs the kernels with the default launch parameters."""
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(6), batch=1, seq_len=40, num_heads=2, k_dim=16, v_dim=16, num_q_heads=1
    )
    args = {name: inputs[name] for name in NAMES}
    y_ref, h_ref = m2rnn(**args, backend="scan")
    y, h = m2rnn(**args, backend="pallas_gpu", interpret=True)
    assert y.dtype == y_ref.dtype and h.dtype == h_ref.dtype
    np.testing.assert_allclose(y, y_ref, atol=2e-5 * float(jnp.abs(y_ref).max()))
    np.testing.assert_allclose(h, h_ref, atol=2e-5)


def test_auto_picks_pallas_gpu_on_nvidia(monkeypatch):
    monkeypatch.setattr(backends, "_platform", lambda: "gpu_nvidia")
    assert backends.resolve_backend_name("auto") == "pallas_gpu"
    assert "pallas_gpu" in backends.available_backends()


def test_forward_checkpoints_are_the_chunk_start_states():
    """The forward kernel's checkpoint c of sequence b equals the reference state after c * chunk_size steps."""
    batch, seq_len, chunk = 2, 11, 4
    inputs = random_m2rnn_inputs(jax.random.PRNGKey(7), batch=batch, seq_len=seq_len, num_heads=2, k_dim=16, v_dim=16)
    flat = {name: inputs[name].reshape((batch * seq_len,) + inputs[name].shape[2:]) for name in ("q", "k", "v", "f")}
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * seq_len
    num_chunks = -(-seq_len // chunk)
    offsets = jnp.arange(batch + 1, dtype=jnp.int32) * num_chunks
    _, _, checkpoints = m2rnn_forward(
        flat["q"],
        flat["k"],
        flat["v"],
        inputs["W"],
        flat["f"],
        inputs["h0"],
        cu,
        offsets,
        num_chunks=batch * num_chunks,
        config=KernelConfig(chunk_size=chunk, recompute_block=chunk),
        y_dtype=jnp.float32,
        interpret=True,
    )
    checkpoints = checkpoints.reshape(batch, num_chunks, *checkpoints.shape[1:])
    for c in range(num_chunks):
        if c == 0:
            expected = inputs["h0"]
        else:
            prefix = {name: inputs[name][:, : c * chunk] for name in ("q", "k", "v", "f")}
            _, expected = m2rnn_scan_dense(
                **prefix, W=inputs["W"], h0=inputs["h0"], gradient_clipping=None, state_dtype=jnp.float32
            )
        np.testing.assert_allclose(checkpoints[:, c], expected, atol=1e-5)


def test_launch_parameters():
    assert [padded_size(n) for n in (1, 9, 16, 17, 64, 72)] == [16, 16, 16, 32, 64, 128]
    paper, single = default_config(batch=8, num_heads=84, k_dim=64), default_config(batch=1, num_heads=84, k_dim=64)
    assert (paper.block_k, paper.num_warps) == (64, 2)
    assert (single.block_k, single.num_warps) == (16, 1)
    assert default_config(batch=8, num_heads=84, k_dim=200).block_k == 64
    with pytest.raises(ValueError, match="recompute_block"):
        KernelConfig(chunk_size=64, recompute_block=6)
    with pytest.raises(ValueError, match="recompute_block"):
        KernelConfig(chunk_size=64, recompute_block=32)
    with pytest.raises(ValueError, match="block_k"):
        KernelConfig(block_k=24)


def test_int32_index_range_is_checked():
    batch, seq_len, heads = 64, 65536, 84
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    call = lambda q, v, w, f: m2rnn_pallas_gpu(
        q, q, v, w, f, None, cu_seqlens=None, gradient_clipping=None, state_dtype=jnp.float32, interpret=True
    )
    with pytest.raises(ValueError, match="int32"):
        jax.eval_shape(
            call,
            spec(batch, seq_len, 1, 64),
            spec(batch, seq_len, heads, 16),
            spec(heads, 16, 16),
            spec(batch, seq_len, heads),
        )


def test_bench_cli_knows_every_benchmark_shape():
    from m2rnn_jax.bench.op import SHAPES
    from m2rnn_jax.commands.bench import SHAPE_NAMES

    assert set(SHAPE_NAMES) == set(SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# Real GPU (run on the device machine: pytest -m gpu tests/kernels/test_pallas_gpu.py)


def _paper_inputs(batch=8, seq_len=4096):
    return random_m2rnn_inputs(
        jax.random.PRNGKey(11),
        batch=batch,
        seq_len=seq_len,
        num_heads=84,
        k_dim=64,
        v_dim=16,
        num_q_heads=1,
        num_k_heads=1,
        dtype=jnp.float32,
    )


@pytest.mark.gpu
def test_gpu_paper_shape_bf16_against_f32_reference():
    """400M layer (B=8, S=4096, N=84, K=64, V=16, Nq=Nk=1), bf16 kernel vs float32 scan on the same values."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    inputs = _paper_inputs()
    reference = {name: inputs[name] for name in NAMES}
    bf16 = {name: x.astype(jnp.bfloat16) for name, x in reference.items()}
    rounded = {name: x.astype(jnp.float32) for name, x in bf16.items()}
    key = jax.random.PRNGKey(12)
    expected = _outputs_and_grads(jax.jit(lambda a: m2rnn(**a, backend="scan")), rounded, key)
    actual = _outputs_and_grads(jax.jit(lambda a: m2rnn(**a, backend="pallas_gpu")), bf16, key)
    for name in expected:
        assert relative_error(actual[name], expected[name]) < 1e-2, name


@pytest.mark.gpu
def test_gpu_f32_matches_reference_closely():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    inputs = _paper_inputs(batch=2, seq_len=512)
    args = {name: inputs[name] for name in NAMES}
    key = jax.random.PRNGKey(13)
    expected = _outputs_and_grads(jax.jit(lambda a: m2rnn(**a, backend="scan")), args, key)
    actual = _outputs_and_grads(jax.jit(lambda a: m2rnn(**a, backend="pallas_gpu")), args, key)
    for name in expected:
        assert relative_error(actual[name], expected[name]) < 1e-4, name


def test_approximate_tanh_only_for_16_bit_inputs_on_the_gpu():
    """The default ``approx_tanh`` (tanh.approx.f32, SPEC §0.2's documented exception; its accuracy against the
    float32 reference is checked by the gpu-marked Gluon tests) applies to 16-bit inputs on the GPU only: float32
    inputs and interpret mode run exact tanh, and ``approx_tanh=False`` selects the exact Gluon form."""
    from m2rnn_jax.ops.m2rnn.pallas_gpu import _gluon_tanh
    from pallas_kernels.gpu.m2rnn_common import StepNumerics

    config = KernelConfig()
    assert config.approx_tanh
    assert StepNumerics.create(jnp.bfloat16, jnp.float32, config, interpret=False).approx_tanh
    assert StepNumerics.create(jnp.float16, jnp.float32, config, interpret=False).approx_tanh
    assert not StepNumerics.create(jnp.float32, jnp.float32, config, interpret=False).approx_tanh
    assert not StepNumerics.create(jnp.bfloat16, jnp.float32, config, interpret=True).approx_tanh
    assert _gluon_tanh(config) == "approx"
    assert _gluon_tanh(dataclasses.replace(config, approx_tanh=False)) == config.gluon_tanh == "mixed"
