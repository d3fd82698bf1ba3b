"""The M2RNN NNX layer used from Linen through ``flax.nnx.bridge.ToLinen``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from m2rnn_jax.layers import M2RNN, M2RNNConfig

CONFIG = M2RNNConfig(num_heads=2, k_head_dim=4, v_head_dim=2)
HIDDEN = 8


class LinenBlock(nn.Module):
    """A Linen parent that owns the bridged mixer, as a Linen model would (pre-norm residual block)."""

    @nn.compact
    def __call__(self, x, state=None):
        mixer = bridge.ToLinen(M2RNN, args=(HIDDEN, CONFIG), kwargs={"num_layers": 2}, name="mixer")
        y, state = mixer(nn.RMSNorm(epsilon=1e-5, name="norm")(x), state)
        return x + y, state


def nnx_layer_with_linen_params(linen_params: dict) -> M2RNN:
    """A separately initialised NNX layer whose parameters are replaced by the Linen ones."""
    layer = M2RNN(HIDDEN, CONFIG, num_layers=2, rngs=nnx.Rngs(123))
    params = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(params, nn.unbox(linen_params))
    nnx.update(layer, params)
    return layer


def test_linen_init_and_apply_match_the_nnx_module():
    x = jax.random.normal(jax.random.key(0), (2, 5, HIDDEN), jnp.float32)
    variables = LinenBlock().init(jax.random.key(1), x)
    out, state = jax.jit(LinenBlock().apply)(variables, x)

    mixer_params = variables["params"]["mixer"]
    # logical axis names travel into Linen as partitioning metadata
    specs = nn.get_partition_spec(mixer_params)
    assert specs["input_projection"]["kernel"] == jax.P("embed", None)
    assert specs["state_weight"] == jax.P("heads", None, None)

    layer = nnx_layer_with_linen_params(mixer_params)
    norm = nn.RMSNorm(epsilon=1e-5).apply({"params": nn.unbox(variables["params"]["norm"])}, x)
    y, nnx_state = layer(norm)
    np.testing.assert_allclose(out, x + y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.recurrent, nnx_state.recurrent, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.conv, nnx_state.conv, rtol=1e-6, atol=1e-6)


def test_linen_decoding_carries_the_state():
    x = jax.random.normal(jax.random.key(2), (1, 6, HIDDEN), jnp.float32)
    block = LinenBlock()
    variables = block.init(jax.random.key(3), x)
    step = jax.jit(block.apply)
    full, _ = step(variables, x)
    state, outputs = None, []
    prefill, state = step(variables, x[:, :2], state)
    outputs.append(prefill)
    for t in range(2, 6):
        y, state = step(variables, x[:, t : t + 1], state)
        outputs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_linen_gradients_match_the_nnx_module():
    x = jax.random.normal(jax.random.key(4), (1, 4, HIDDEN), jnp.float32)
    mixer = bridge.ToLinen(M2RNN, args=(HIDDEN, CONFIG), kwargs={"num_layers": 2})
    variables = mixer.init(jax.random.key(5), x)
    linen_grads = jax.jit(jax.grad(lambda v: jnp.sum(mixer.apply(v, x)[0] ** 2)))(variables)["params"]

    layer = nnx_layer_with_linen_params(variables["params"])
    graphdef, params = nnx.split(layer, nnx.Param)
    nnx_grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        nn.unbox(linen_grads),
        nnx.to_pure_dict(nnx_grads),
    )
