"""The projections' column blocks: ``linear_blocks`` equals a split of the product, and the mixers that split a
projection keep its blocks apart (no activation of the projection's full width, forward or backward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from m2rnn_jax.layers.linear import linear_blocks, sharded_linear
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig
from m2rnn_jax.layers.mamba2 import Mamba2, Mamba2Config


def projection(use_bias: bool) -> nnx.Linear:
    """A (6 -> 9) float32 projection."""
    return sharded_linear(
        6, 9, ("embed", None), std=0.5, use_bias=use_bias, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )


@pytest.mark.parametrize("use_bias", [False, True])
def test_blocks_equal_the_split_product(use_bias):
    linear = projection(use_bias)
    if use_bias:
        linear.bias[...] = jnp.arange(9.0)
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    blocks = linear_blocks(linear, x, (2, 1, 6))
    expected = jnp.split(linear(x), [2, 3], axis=-1)
    assert [b.shape for b in blocks] == [(2, 3, 2), (2, 3, 1), (2, 3, 6)]
    for block, reference in zip(blocks, expected, strict=True):
        np.testing.assert_allclose(np.asarray(block), np.asarray(reference), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("widths", [(2, 6), (0, 9), (4, 4, 2)])
def test_bad_widths_raise(widths):
    linear = projection(use_bias=False)
    with pytest.raises(ValueError, match="widths: expected positive block widths summing to 9"):
        linear_blocks(linear, jnp.ones((1, 6)), widths)


MIXERS = {
    # (layer, the name of its split projection); widths chosen so that the projection's width is unique
    "gated_deltanet": (
        lambda: GatedDeltaNet(
            12,
            GatedDeltaNetConfig(num_heads=2, num_k_heads=1, k_head_dim=4, v_head_dim=24),
            num_layers=2,
            rngs=nnx.Rngs(0),
        ),
        "ab_proj",
    ),
    "m2rnn": (
        lambda: M2RNN(12, M2RNNConfig(num_heads=2, k_head_dim=4, v_head_dim=8), num_layers=2, rngs=nnx.Rngs(0)),
        "input_projection",
    ),
    "mamba2": (
        lambda: Mamba2(
            12,
            Mamba2Config(num_heads=3, intermediate_size=12, state_size=5, chunk_size=4),
            num_layers=2,
            rngs=nnx.Rngs(0),
        ),
        "in_proj",
    ),
}


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_split_projections_keep_their_blocks_apart(mixer):
    """The gradient of a split product is a concatenate of the blocks' gradients, an activation-sized copy (in the
    GDN layer, of unaligned width 2 Nv + Nv dv: 14 ms of the 400M hybrid's H200 step, experiments/RESULTS.md)."""
    factory, projection = MIXERS[mixer]
    layer = factory()
    graphdef, params = nnx.split(layer)
    width = getattr(layer, projection).out_features
    x = jnp.ones((3, 8, 12))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(y**2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x))
    assert f"[12,{width}]" in jaxpr  # the kernel and its gradient
    assert f"[3,8,{width}]" not in jaxpr
