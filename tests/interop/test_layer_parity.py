"""The Flax NNX M2RNN layer against the PyTorch ``M2RNNTorch`` twin with identical (converted) weights.

Checks the output, the new conv and recurrent states, and the gradients of every parameter, of the input and of
the incoming states, via ``compare_layer_with_torch``: relative error (max |jax - torch| / max |torch|) below
1e-10 in float64 and 1e-5 in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from m2rnn_jax.interop.conversion import compare_layer_with_torch, randomize_layer_params  # noqa: E402
from m2rnn_jax.layers import M2RNN, M2RNNConfig, M2RNNState  # noqa: E402

TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-5}
HIDDEN = 12

CONFIGS = {
    "paper-like-Nq=Nk=1": dict(num_heads=4, k_head_dim=6, v_head_dim=3),
    "mixed-heads-bias-binding-clip": dict(
        num_heads=8,
        k_head_dim=3,
        v_head_dim=2,
        num_q_heads=2,
        num_k_heads=4,
        num_weight_heads=2,
        num_g_heads=2,
        add_bias=True,
        gradient_clipping=0.05,
    ),
    "no-conv-no-residual-no-clip": dict(
        num_heads=4,
        k_head_dim=3,
        v_head_dim=4,
        num_q_heads=4,
        num_k_heads=2,
        num_v_heads=2,
        kernel_size=None,
        activation_function=None,
        use_residual=False,
        gradient_clipping=None,
    ),
}
# Every config in float64 (the logic), the busiest one in float32 too (the precision).
CASES = [pytest.param(kwargs, jnp.float64, id=f"{name}-f64") for name, kwargs in CONFIGS.items()] + [
    pytest.param(CONFIGS["mixed-heads-bias-binding-clip"], jnp.float32, id="mixed-heads-bias-binding-clip-f32")
]
DTYPES = [pytest.param(jnp.float64, id="f64"), pytest.param(jnp.float32, id="f32")]


def rbg_key(seed):
    """A key whose random draws compile to one XLA op (threefry compiles cost seconds each on CI's CPUs)."""
    return jax.random.key(seed, impl="rbg")


def make_layer(config_kwargs, dtype, seed=0):
    config = M2RNNConfig(**config_kwargs, backend="scan")
    layer = M2RNN(
        HIDDEN,
        config,
        num_layers=2,
        initializer_range=0.3,
        dtype=dtype,
        param_dtype=dtype,
        rngs=nnx.Rngs(rbg_key(seed)),
    )
    return randomize_layer_params(layer, seed + 1)


def random_normal(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_state(layer, batch, dtype, seed):
    zeros = layer.init_state(batch, 0, dtype=dtype)
    conv = None if zeros.conv is None else random_normal(seed, zeros.conv.shape, dtype)
    return M2RNNState(conv=conv, recurrent=jnp.tanh(random_normal(seed + 1, zeros.recurrent.shape, dtype)))


def assert_small(errors, dtype):
    bad = {name: err["rel"] for name, err in errors.items() if not err["rel"] < TOLERANCE[dtype]}
    assert not bad, f"relative errors over {TOLERANCE[dtype]:g}: {bad}"


@pytest.mark.parametrize("config_kwargs,dtype", CASES)
def test_layer_parity_from_zero_state(x64, config_kwargs, dtype):
    layer = make_layer(config_kwargs, dtype)
    x = random_normal(7, (2, 5, HIDDEN), dtype)
    errors = compare_layer_with_torch(layer, x)
    expected = {
        "y",
        "recurrent_state",
        "grad/x",
        "grad/state_weight",
        "grad/decay_gate.A_log",
        "grad/decay_gate.dt_bias",
        "grad/g_norm.weight",
        "grad/input_projection.weight",
        "grad/output_projection.weight",
    }
    assert expected <= set(errors)
    assert_small(errors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_parity_with_incoming_state(x64, dtype):
    layer = make_layer(dict(num_heads=4, k_head_dim=4, v_head_dim=2, num_g_heads=1, add_bias=True), dtype)
    x = random_normal(3, (2, 4, HIDDEN), dtype)
    errors = compare_layer_with_torch(layer, x, random_state(layer, 2, dtype, seed=4))
    assert {"conv_state", "grad/state.conv", "grad/state.recurrent", "grad/conv1d.weight"} <= set(errors)
    assert_small(errors, dtype)
