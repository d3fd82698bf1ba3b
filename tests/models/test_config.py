"""ModelConfig validation: every bad field raises ValueError naming it."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.presets import tiny_config


def test_tiny_config_is_valid_and_canonicalises_dtypes():
    config = tiny_config("MA").replace(dtype=jnp.bfloat16, param_dtype="float32")
    assert config.dtype == "bfloat16" and config.compute_dtype == jnp.bfloat16
    assert config.param_dtype == "float32" and config.parameter_dtype == jnp.float32
    assert config.mixer_config("M") is config.m2rnn


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(layer_pattern="MX"), "layer_pattern"),
        (dict(layer_pattern="MAM"), "layer_pattern"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(hidden_size=64.0), "hidden_size"),
        (dict(m2rnn=None), "m2rnn"),
        (dict(dtype="int8"), "dtype"),
        (dict(param_dtype="complex64"), "param_dtype"),
        (dict(initializer_range=0.0), "initializer_range"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(mlp=None), "mlp"),
        (dict(head_statistics="fused"), "head_statistics"),
        (dict(head_logits="bfloat16"), "head_logits: expected one of"),
    ],
)
def test_bad_field_raises_naming_it(changes, field):
    base = tiny_config("MA")
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(base, **changes)


def test_unused_mixer_config_is_rejected():
    base = tiny_config("MA")
    extra = tiny_config("G").gated_deltanet
    with pytest.raises(ValueError, match="gated_deltanet.*does not use"):
        dataclasses.replace(base, gated_deltanet=extra)


def test_mixer_config_of_wrong_type_is_rejected():
    base = tiny_config("MA")
    with pytest.raises(ValueError, match="attention: expected AttentionConfig"):
        dataclasses.replace(base, attention=base.m2rnn)


def test_attention_heads_must_divide_hidden_size_without_head_dim():
    base = tiny_config("MA")
    with pytest.raises(ValueError, match="attention.num_heads"):
        dataclasses.replace(base, attention=AttentionConfig(num_heads=3))
    assert dataclasses.replace(base, attention=AttentionConfig(num_heads=3, head_dim=16)).attention.num_heads == 3


def test_mixer_config_lookup_rejects_unknown_letter():
    with pytest.raises(ValueError, match="letter"):
        tiny_config("M").mixer_config("Z")


def test_config_is_hashable_and_frozen():
    config = tiny_config("MGSARU")
    assert hash(config) == hash(tiny_config("MGSARU"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 3  # type: ignore[misc]
    assert isinstance(config, ModelConfig)
