"""The fused walk over chunks of the gated delta rule (pallas_kernels/gpu/gdn_chunk_states.py).

On CPU the kernels run in Pallas interpret mode against ``lax.scan``
(:func:`m2rnn_jax.ops.gated_delta_rule.chunked.scan_states`) and its autodiff, forward and every cotangent; tests
marked ``gpu`` run the whole pallas_gpu backend compiled on an NVIDIA GPU against the float32 chunked reference, by
default and with each opt-in fused stage (the kernels of gdn_chunk_factors.py, gdn_chunk_outputs.py,
gdn_walk_cotangents.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops import gated_delta_rule
from m2rnn_jax.ops.gated_delta_rule.chunked import scan_states
from m2rnn_jax.testing import cuda_lowering_without_a_gpu, random_gdn_inputs, relative_error
from pallas_kernels.gpu.gdn_chunk_states import StatesKernelConfig, chunk_states_backward, chunk_states_forward

ARGS = ("q", "k", "v", "beta", "log_alpha", "h0")


def random_factors(seed, batch=2, heads=1, chunks=3, chunk=16, k_dim=16, v_dim=32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.3, jnp.float32)
    U, Wk, Kd = (normal(batch, heads, chunks, chunk, d) for d in (v_dim, k_dim, k_dim))
    carry = jnp.asarray(rng.uniform(0.0, 1.0, (batch, heads, chunks)), jnp.float32).at[0, 0, 1].set(0.0)
    return U, Wk, Kd, carry, normal(batch, heads, k_dim, v_dim)


@pytest.mark.parametrize("block_v", [16, 32])
def test_kernels_match_scan_and_its_vjp_in_interpret_mode(block_v):
    config = StatesKernelConfig(block_v=block_v, num_warps=4, num_stages=1)
    U, Wk, Kd, carry, h0 = random_factors(block_v)
    w, starts, final = chunk_states_forward(U, Wk, Kd, carry, h0, config=config, interpret=True)
    (w_ref, starts_ref, final_ref), vjp = jax.vjp(scan_states, U, Wk, Kd, carry, h0)
    for got, ref in ((w, w_ref), (starts, starts_ref), (final, final_ref)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)

    rng = np.random.default_rng(7)
    cotangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (w, starts, final))
    dU, dWk, dKd, dcarry, dh0 = vjp(cotangents)
    dw, g_next, dh0_kernel = chunk_states_backward(Wk, Kd, carry, *cotangents, config=config, interpret=True)
    np.testing.assert_allclose(dw, dU, rtol=1e-5, atol=1e-5)  # dU = dW
    np.testing.assert_allclose(dh0_kernel, dh0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(-jnp.einsum("...cv,...kv->...ck", dw, starts), dWk, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.einsum("...cv,...kv->...ck", w, g_next), dKd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(g_next * starts, axis=(-2, -1)), dcarry, rtol=1e-5, atol=1e-5)


def test_bad_kernel_config_raises():
    with pytest.raises(ValueError, match="block_v: expected a power of two >= 16"):
        StatesKernelConfig(block_v=24)
    with pytest.raises(ValueError, match="num_warps: expected a positive int"):
        StatesKernelConfig(num_warps=0)


def _outputs_and_grads(run, x, do, dh):
    (o, h), vjp = jax.vjp(run, *(x[n] for n in ARGS))
    return (o, h) + tuple(vjp((do.astype(o.dtype), dh)))


def _gpu_case(dtype):
    """Inputs at S = 1000 (ragged: 15 x 64 + 40, 7 x 128 + 104) with resets, and cotangents of o and h_final."""
    x = random_gdn_inputs(0, 2, 1000, 2, 128, 256, dtype=dtype, reset_rate=0.005)
    reset = x.pop("reset")
    rng = np.random.default_rng(1)
    do = jnp.asarray(rng.standard_normal((2, 1000, 2, 256)), jnp.float32)
    dh = jnp.asarray(rng.standard_normal((2, 2, 128, 256)), jnp.float32)
    return x, reset, do, dh


def _chunked_float32(x, reset, do, dh, chunk_size):
    x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
    run = lambda *a: gated_delta_rule(*a, reset=reset, chunk_size=chunk_size, backend="chunked")  # noqa: E731
    return _outputs_and_grads(run, x32, do, dh)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, tol, chunk_size", [(jnp.bfloat16, 2e-2, 64), (jnp.float32, 1e-4, 64), (jnp.bfloat16, 2e-2, 128)]
)
def test_pallas_gpu_matches_float32_reference_on_gpu(dtype, tol, chunk_size):
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    x, reset, do, dh = _gpu_case(dtype)
    reference = _chunked_float32(x, reset, do, dh, chunk_size)

    def fused(x, reset, do, dh):
        run = lambda *a: gated_delta_rule(*a, reset=reset, chunk_size=chunk_size, backend="pallas_gpu")  # noqa: E731
        return _outputs_and_grads(run, x, do, dh)

    for name, got, ref in zip(
        ("o", "h_final") + tuple(f"d{n}" for n in ARGS), jax.jit(fused)(x, reset, do, dh), reference
    ):
        assert relative_error(got, ref) < tol, name


FUSED_STAGES = {
    "local": {"local": "fused"},
    "local_backward": {"local": "fused", "local_backward": "fused"},
    "outputs": {"outputs": "fused"},
    "walk_cotangents": {"walk_cotangents": "fused"},
    "all": {"local": "fused", "local_backward": "fused", "outputs": "fused", "walk_cotangents": "fused"},
}


@pytest.mark.gpu
@pytest.mark.parametrize("stages", list(FUSED_STAGES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fused_stages_match_float32_reference_on_gpu(stages, dtype):
    """The backend with each opt-in fused stage (the local factors, with their backward kernel too, the outputs, the
    walk's input cotangents) and with all, compiled, against the float32 chunked reference: outputs, final state
    and every gradient."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu

    x, reset, do, dh = _gpu_case(dtype)
    reference = _chunked_float32(x, reset, do, dh, 64)
    x = {n: a.astype(jnp.float32) if n in ("beta", "log_alpha", "h0") else a for n, a in x.items()}

    def fused(x, reset, do, dh):
        run = lambda *a: gated_delta_rule_pallas_gpu(*a, reset, chunk_size=64, **FUSED_STAGES[stages])  # noqa: E731
        return _outputs_and_grads(run, x, do, dh)

    for name, got, ref in zip(
        ("o", "h_final") + tuple(f"d{n}" for n in ARGS), jax.jit(fused)(x, reset, do, dh), reference
    ):
        assert relative_error(got.astype(jnp.float32), ref) < 2e-2, name


def test_every_fused_stage_lowers_for_cuda():
    """Without a GPU: the backend with all four fused stages, forward and gradient, lowers for CUDA with each of its
    eight Pallas-Triton kernels in the module (a Triton lowering rule missing for an op in a kernel fails here, not
    on the device)."""
    from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu

    x = random_gdn_inputs(0, 1, 100, 2, 32, 64, dtype=jnp.bfloat16, reset_rate=0.05)
    reset = x.pop("reset")
    x = {n: a.astype(jnp.float32) if n in ("beta", "log_alpha", "h0") else a for n, a in x.items()}

    def loss(*a):
        o, h = gated_delta_rule_pallas_gpu(*a, reset, chunk_size=16, **FUSED_STAGES["all"])
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(h)

    traced = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*(x[n] for n in ARGS))
    with cuda_lowering_without_a_gpu():
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    kernels = (
        "gdn_chunk_factors_forward",
        "gdn_chunk_factors_backward",
        "gdn_chunk_states_forward",
        "gdn_chunk_states_backward",
        "gdn_walk_input_cotangents",
        "gdn_chunk_outputs_forward",
        "gdn_chunk_outputs_state_cotangents",
        "gdn_chunk_outputs_factor_cotangents",
    )
    assert [name for name in kernels if name not in text] == []
