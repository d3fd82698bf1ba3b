"""Flax NNX M2RNN layer <-> lm-engine state dict: names, layouts, round trip, and the reverse direction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from m2rnn_jax.interop.conversion import (  # noqa: E402
    flax_params_from_torch_state_dict,
    randomize_layer_params,
    to_jax,
    to_torch,
    torch_layer_from_flax,
    torch_state_dict_from_flax,
)
from m2rnn_jax.interop.torch_reference import M2RNNTorch  # noqa: E402
from m2rnn_jax.layers import M2RNN, M2RNNConfig  # noqa: E402

HIDDEN = 10
CONFIG = M2RNNConfig(
    num_heads=4, k_head_dim=3, v_head_dim=2, num_g_heads=2, num_weight_heads=2, add_bias=True, backend="scan"
)
TORCH_KWARGS = dict(
    num_heads=4,
    k_head_dim=3,
    v_head_dim=2,
    num_q_heads=1,
    num_k_heads=1,
    num_v_heads=4,
    num_f_heads=4,
    num_g_heads=2,
    num_weight_heads=2,
    add_bias=True,
)


def make_layer(seed):
    layer = M2RNN(HIDDEN, CONFIG, num_layers=2, initializer_range=0.3, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
    return randomize_layer_params(layer, seed + 100)


def flat_params(layer):
    return {
        "/".join(map(str, path)): np.asarray(value)
        for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
    }


def test_state_dict_names_and_shapes_match_lm_engine_module():
    state_dict = torch_state_dict_from_flax(make_layer(0))
    reference = M2RNNTorch(HIDDEN, **TORCH_KWARGS).state_dict()
    assert {name: tuple(t.shape) for name, t in state_dict.items()} == {
        name: tuple(t.shape) for name, t in reference.items()
    }
    # C = (Nq + Nk) K + Nv V = 14 conv channels; projection rows C + Nf + Ng V = 22
    assert tuple(state_dict["conv1d.weight"].shape) == (14, 1, 4)
    assert tuple(state_dict["input_projection.weight"].shape) == (22, HIDDEN)


def test_layouts():
    layer = make_layer(1)
    state_dict = torch_state_dict_from_flax(layer)
    kernel = np.asarray(layer.conv1d.kernel[...])  # (ks, C)
    np.testing.assert_array_equal(state_dict["conv1d.weight"].numpy()[5, 0, 2], kernel[2, 5])
    np.testing.assert_array_equal(
        state_dict["input_projection.weight"].numpy(), np.asarray(layer.input_projection.kernel[...]).T
    )
    np.testing.assert_array_equal(state_dict["g_norm.weight"].numpy(), np.asarray(layer.g_norm.scale[...]))


def test_round_trip_flax_torch_flax_is_exact():
    source, target = make_layer(2), make_layer(3)
    before = flat_params(target)
    flax_params_from_torch_state_dict(torch_state_dict_from_flax(source), target)
    after, expected = flat_params(target), flat_params(source)
    assert any(not np.array_equal(before[name], expected[name]) for name in expected)
    assert after.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(after[name], expected[name], err_msg=name)
        assert after[name].dtype == before[name].dtype


def test_torch_initialised_weights_drive_flax_layer_like_torch():
    """Reverse direction: a torch-initialised module's weights loaded into Flax give torch's output."""
    torch.manual_seed(0)
    module = M2RNNTorch(HIDDEN, **TORCH_KWARGS, initializer_range=0.3)
    layer = flax_params_from_torch_state_dict(module.state_dict(), make_layer(4))
    x = np.random.default_rng(0).standard_normal((2, 6, HIDDEN)).astype(np.float32)
    y, state = layer(jnp.asarray(x))
    with torch.no_grad():
        y_torch, (conv_torch, recurrent_torch) = module(to_torch(x))
    np.testing.assert_allclose(np.asarray(y), y_torch.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.recurrent), recurrent_torch.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.conv), conv_torch.transpose(1, 2).numpy())


def test_torch_layer_from_flax_loads_every_weight():
    layer = make_layer(5)
    module = torch_layer_from_flax(layer)
    for name, tensor in torch_state_dict_from_flax(layer).items():
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=0, atol=0)


def test_bad_state_dict_raises():
    state_dict = torch_state_dict_from_flax(make_layer(6))
    missing = {name: t for name, t in state_dict.items() if name != "D"}
    with pytest.raises(ValueError, match="missing \\['D'\\]"):
        flax_params_from_torch_state_dict(missing, make_layer(7))
    wrong = dict(state_dict, state_weight=torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="state_weight"):
        flax_params_from_torch_state_dict(wrong, make_layer(7))


def test_array_conversion_keeps_dtypes():
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
        x = jnp.arange(6, dtype=dtype).reshape(2, 3)
        back = to_jax(to_torch(x))
        assert back.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(x, np.float32))
