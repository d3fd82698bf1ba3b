"""SwiGLU MLP and MoE vs per-token float64 NumPy references; routing invariants and the auxiliary loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers.mlp import MLP, MLPConfig, MoE, MoEConfig, route_tokens, router_aux_loss
from tests.layers.mixer_helpers import count_params


def numpy_swiglu(x: np.ndarray, c_fc: np.ndarray, c_proj: np.ndarray) -> np.ndarray:
    """Interleaved SwiGLU: gate = even columns, up = odd columns of x @ c_fc."""
    h = x @ c_fc
    gate, up = h[..., 0::2], h[..., 1::2]
    return (up * gate / (1.0 + np.exp(-gate))) @ c_proj


def numpy_moe(module: MoE, x: np.ndarray) -> np.ndarray:
    """Route each token by itself: top-k logits, softmax over them, weighted expert SwiGLUs + shared expert."""
    c = module.config
    gate = np.asarray(module.gate.kernel[...])
    c_fc, c_proj = np.asarray(module.c_fc.kernel[...]), np.asarray(module.c_proj.kernel[...])
    out = np.zeros_like(x)
    for t, token in enumerate(x):
        logits = token @ gate
        chosen = np.argsort(-logits)[: c.top_k]
        weights = np.exp(logits[chosen] - logits[chosen].max())
        weights /= weights.sum()
        for weight, e in zip(weights, chosen):
            out[t] += weight * numpy_swiglu(token, c_fc[e], c_proj[e])
        if module.c_fc_shared is not None:
            out[t] += numpy_swiglu(
                token, np.asarray(module.c_fc_shared.kernel[...]), np.asarray(module.c_proj_shared.kernel[...])
            )
    return out


def make(cls, config, *, hidden=8, dtype=jnp.float32, key=0):
    return cls(hidden, config, num_layers=2, initializer_range=0.4, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key))


def test_mlp_matches_numpy_float64(x64):
    module = make(MLP, MLPConfig(intermediate_size=6), dtype=jnp.float64)
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    y = jax.jit(lambda x: module(x))(jnp.asarray(x))
    expected = numpy_swiglu(x, np.asarray(module.c_fc.kernel[...]), np.asarray(module.c_proj.kernel[...]))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gpu", [False, True])
def test_mlp_keeps_the_swiglu_output_on_nvidia_gpus_only(monkeypatch, gpu):
    """On an NVIDIA GPU the SwiGLU output passes an optimization barrier (so XLA's GPU compiler keeps the forward's
    array for c_proj's kernel gradient instead of recomputing it); elsewhere the graph has none. Values and
    gradients are the same either way."""
    from m2rnn_jax.layers import mlp

    module = make(MLP, MLPConfig(intermediate_size=6))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32)
    loss = lambda x: jnp.sum(module(x) ** 2)  # noqa: E731
    expected = jax.value_and_grad(loss)(x)
    monkeypatch.setattr(mlp, "on_nvidia_gpu", lambda: gpu)
    assert ("optimization_barrier" in str(jax.make_jaxpr(jax.grad(loss))(x))) == gpu
    for got, want in zip(jax.value_and_grad(loss)(x), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shared", [None, 5])
def test_moe_matches_numpy_float64(x64, shared):
    config = MoEConfig(num_experts=5, top_k=2, intermediate_size=4, shared_intermediate_size=shared)
    module = make(MoE, config, dtype=jnp.float64)
    x = np.random.default_rng(1).standard_normal((3, 7, 8))
    y, aux = jax.jit(lambda x: module(x))(jnp.asarray(x))
    np.testing.assert_allclose(y, numpy_moe(module, x.reshape(-1, 8)).reshape(x.shape), rtol=1e-11, atol=1e-12)
    assert aux.shape == () and aux.dtype == jnp.float64 and float(aux) > 0


def test_routing_weights_sum_to_one_over_the_argmax_set():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((50, 9)), jnp.float32)
    weights, experts = route_tokens(logits, 3)
    np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, rtol=1e-6)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    assert all(set(row) == set(expected) for row, expected in zip(np.asarray(experts), top3))
    chosen_logits = np.take_along_axis(np.asarray(logits), np.asarray(experts), axis=-1)
    expected_weights = np.exp(chosen_logits) / np.exp(chosen_logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)


def test_aux_loss_on_a_hand_built_router_output():
    # token 0: probabilities (1/4, 3/4); token 1: (2/5, 3/5); both pick expert 1 with k = 1.
    logits = jnp.array([[0.0, math.log(3.0)], [0.0, math.log(1.5)]], jnp.float32)
    _, experts = route_tokens(logits, 1)
    np.testing.assert_array_equal(experts, [[1], [1]])
    mean_probability = np.array([(0.25 + 0.4) / 2, (0.75 + 0.6) / 2])
    switch = 2 * np.sum(mean_probability * np.array([0.0, 1.0]))  # = 1.35
    z = (math.log(4.0) ** 2 + math.log(2.5) ** 2) / 2
    np.testing.assert_allclose(router_aux_loss(logits, experts), switch + 0.1 * z, rtol=1e-6)
    module = make(MoE, MoEConfig(num_experts=2, top_k=1, intermediate_size=4, router_aux_loss_coef=0.01), hidden=2)
    module.gate.kernel[...] = jnp.eye(2, dtype=jnp.float32)  # logits == tokens
    _, aux = jax.jit(lambda x: module(x))(logits[None])
    np.testing.assert_allclose(aux, 0.01 * (switch + 0.1 * z), rtol=1e-6)


def test_shared_expert_is_always_applied():
    config = MoEConfig(num_experts=4, top_k=2, intermediate_size=4, shared_intermediate_size=6)
    module = make(MoE, config)
    module.c_proj.kernel[...] = jnp.zeros_like(module.c_proj.kernel[...])  # silence every routed expert
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 8)), jnp.float32)
    y, _ = jax.jit(lambda x: module(x))(x)
    shared = numpy_swiglu(
        np.asarray(x), np.asarray(module.c_fc_shared.kernel[...]), np.asarray(module.c_proj_shared.kernel[...])
    )
    np.testing.assert_allclose(y, shared, rtol=1e-5, atol=1e-6)
    assert np.abs(shared).min() > 0


def test_moe_gradients_reach_router_experts_and_shared_expert():
    config = MoEConfig(num_experts=4, top_k=2, intermediate_size=4, shared_intermediate_size=6)
    module = make(MoE, config)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 8)), jnp.float32)

    @jax.jit
    def grads(params):
        def loss(params):
            y, aux = nnx.merge(graphdef, params)(x)
            return jnp.sum(y**2) + aux

        return jax.grad(loss)(params)

    graphdef, params = nnx.split(module, nnx.Param)
    for path, grad in nnx.to_flat_state(grads(params)):
        assert np.all(np.isfinite(grad[...])) and np.abs(grad[...]).max() > 0, path


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5, intermediate_size=8)
    with pytest.raises(ValueError, match="intermediate_size"):
        MLPConfig(intermediate_size=0)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        MoEConfig(num_experts=4, top_k=2, intermediate_size=8, router_aux_loss_coef=-1.0)


def test_parameter_counts_at_paper_sizes():
    mlp = count_params(lambda: MLP(1024, MLPConfig(intermediate_size=2752), num_layers=24, rngs=nnx.Rngs(0)))
    assert mlp == 1024 * 2 * 2752 + 2752 * 1024
    moe_config = MoEConfig(num_experts=128, top_k=8, intermediate_size=256, shared_intermediate_size=1024)
    moe = count_params(lambda: MoE(1536, moe_config, num_layers=40, rngs=nnx.Rngs(0)))
    routed = 128 * (1536 * 512 + 256 * 1536)
    assert moe == 1536 * 128 + routed + 1536 * 2048 + 1024 * 1536  # ≈ 155.9M per 7B layer
