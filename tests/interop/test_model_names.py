"""Whole-decoder name map and lm-engine config translation (no JAX compilation: shapes come from eval_shape)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from m2rnn_jax.interop.lm_engine_config import from_lm_engine_config, to_lm_engine_config  # noqa: E402
from m2rnn_jax.interop.names import lm_engine_tensors, name_map, params_from_tensors  # noqa: E402
from m2rnn_jax.interop.torch_decoder import DecoderTorch  # noqa: E402
from m2rnn_jax.layers.attention import AttentionConfig  # noqa: E402
from m2rnn_jax.layers.mlp import MLPConfig, MoEConfig  # noqa: E402
from m2rnn_jax.models import Decoder  # noqa: E402
from m2rnn_jax.models.presets import get_preset, tiny_config  # noqa: E402

FAMILIES = ["MGSARU", "MMAM", "GGAM", "SSAM", "RU", "A"]


def _abstract_params(config):
    return nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)


def _variants():
    moe = tiny_config("MGSARU", moe=True)
    rope = tiny_config("A").replace(
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, position_embedding="rope", add_bias=True)
    )
    biased = tiny_config("SR", moe=True).replace(
        mlp=MoEConfig(num_experts=3, top_k=2, intermediate_size=8, shared_intermediate_size=None, add_bias=True),
        tie_embeddings=True,
    )
    return {"moe": moe, "rope-bias": rope, "bias-tied": biased, "dense": tiny_config("MGSARU")}


@pytest.mark.parametrize("name", list(_variants()))
def test_name_map_matches_the_twin_state_dict(name):
    config = _variants()[name]
    mapping = name_map(_abstract_params(config))
    twin = DecoderTorch(to_lm_engine_config(config))
    expected = {key: tuple(value.shape) for key, value in twin.state_dict().items()}
    assert {entry.name: entry.lm_engine_shape for entry in mapping.values()} == expected


def test_name_map_rules():
    mapping = name_map(_abstract_params(tiny_config("MGSARU", moe=True)))
    assert mapping["embed.embedding"].name == "transformer.wte.weight"
    assert mapping["lm_head.kernel"][:2] == ("lm_head.weight", "transpose")
    assert mapping["blocks.0.mixer.conv1d.kernel"][:2] == ("transformer.h.0.sequence_mixer.conv1d.weight", "conv")
    assert mapping["blocks.1.mixer.qkv_conv1d.kernel"].kind == "conv"
    assert mapping["blocks.2.mlp.c_fc.kernel"][:2] == ("transformer.h.2.mlp_block.c_fc.weight", "experts")
    assert mapping["blocks.3.norm2.scale"].name == "transformer.h.3.ln_2.weight"
    assert mapping["blocks.5.mixer.state_weight"][:2] == ("transformer.h.5.sequence_mixer.state_weight", "copy")


def _random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype), nnx.to_pure_dict(_abstract_params(config))
    )


def test_params_round_trip_is_exact():
    config = tiny_config("MGSARU", moe=True)
    params = _random_params(config)
    tensors = dict(lm_engine_tensors(params))
    back = params_from_tensors(_abstract_params(config), tensors.__getitem__, set(tensors))
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert original.dtype == restored.dtype and original.tobytes() == restored.tobytes()


def test_params_from_tensors_names_missing_unexpected_and_misshaped():
    config = tiny_config("MA")
    template = _abstract_params(config)
    tensors = dict(lm_engine_tensors(_random_params(config)))
    broken = {k: v for k, v in tensors.items() if k != "transformer.h.0.sequence_mixer.D"}
    broken["transformer.h.0.sequence_mixer.extra"] = np.zeros(3)
    with pytest.raises(
        ValueError,
        match=r"missing tensors \['transformer.h.0.sequence_mixer.D'\]; unexpected "
        r"tensors \['transformer.h.0.sequence_mixer.extra'\]",
    ):
        params_from_tensors(template, broken.__getitem__, set(broken))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].T
    with pytest.raises(ValueError, match=r"lm_head.weight: expected shape \(256, 64\), got \(64, 256\)"):
        params_from_tensors(template, tensors.__getitem__, set(tensors))


def _jax_only_fields_reset(config):
    """``config`` with the execution-only fields that lm-engine has no place for set to their defaults."""
    changes = {}
    if config.gated_deltanet is not None:
        changes["gated_deltanet"] = config.gated_deltanet.__class__(
            **{**config.gated_deltanet.__dict__, "chunk_size": 64, "backend": "auto"}
        )
    return config.replace(**changes)


@pytest.mark.parametrize("pattern", FAMILIES)
@pytest.mark.parametrize("moe", [False, True])
def test_config_round_trip_tiny_families(pattern, moe):
    config = tiny_config(pattern, moe=moe)
    lm = to_lm_engine_config(config)
    assert from_lm_engine_config(lm) == _jax_only_fields_reset(config)
    assert to_lm_engine_config(from_lm_engine_config(lm)) == lm


@pytest.mark.parametrize(
    "preset",
    [
        "hybrid-gdn-m2rnn-3l-400m",
        "hybrid-mamba2-m2rnn-1l-400m",
        "attention-400m",
        "gru-400m",
        "rnn-400m",
        "hybrid-m2rnn-7b",
    ],
)
def test_config_round_trip_paper_presets(preset):
    config = get_preset(preset).replace(dtype="float32", param_dtype="float32", remat="none")
    lm = to_lm_engine_config(config)
    assert to_lm_engine_config(from_lm_engine_config(lm)) == lm
    assert from_lm_engine_config(lm).layer_pattern == config.layer_pattern


def _lm_config():
    return to_lm_engine_config(tiny_config("MGSARU", moe=True))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(m_width=2.0), r"config.m_width: expected one of \[None\]"),
        (lambda c: c.update(normalization_function="layernorm"), r"config.normalization_function"),
        (lambda c: c.update(brand_new=1), r"config: fields without a counterpart in m2rnn-jax: \['brand_new'\]"),
        (lambda c: c["sequence_mixer_blocks"][3].update(sliding_window=128), r"\[3\].sliding_window"),
        (lambda c: c["sequence_mixer_blocks"][5].update(num_reset_input_heads=2), r"\[5\]: only equal head counts"),
        (lambda c: c["sequence_mixer_blocks"][0].update(extra=1), r"\[0\]: fields without a counterpart.*extra"),
        (lambda c: c["mlp_blocks"][1].update(intermediate_size=8), r"config.mlp_blocks: every layer must have"),
        (lambda c: c["mlp_blocks"][0].update(normalized_topk=False), r"\[0\].normalized_topk"),
        (lambda c: c["sequence_mixer_blocks"].append(dict(c["sequence_mixer_blocks"][0])), r"num_layers=6"),
        (lambda c: c["sequence_mixer_blocks"][2].update(time_step_limit=[0.0, 1.0]), r"time_step_limit"),
        (
            lambda c: c["sequence_mixer_blocks"][2].update(sequence_mixer_type="linear_attention"),
            r"sequence_mixer_type: expected one of",
        ),
    ],
)
def test_untranslatable_lm_engine_fields_are_errors(edit, message):
    config = copy.deepcopy(_lm_config())
    edit(config)
    with pytest.raises(ValueError, match=message):
        from_lm_engine_config(config)


def test_blocks_of_one_mixer_type_must_agree():
    config = to_lm_engine_config(tiny_config("MMAM"))
    config["sequence_mixer_blocks"][1]["k_head_dim"] = 8
    with pytest.raises(ValueError, match=r"\[1\]: every m2rnn block must have the same config"):
        from_lm_engine_config(config)


def test_norm_eps_follows_lm_engine():
    """GDN and Mamba2 norms use layer_norm_epsilon in lm-engine; M2RNN / RNN / GRU norms a fixed 1e-5."""
    config = tiny_config("MGSR")
    config = config.replace(
        norm_eps=1e-6,
        gated_deltanet=config.gated_deltanet.__class__(**{**config.gated_deltanet.__dict__, "norm_eps": 1e-6}),
        mamba2=config.mamba2.__class__(**{**config.mamba2.__dict__, "norm_eps": 1e-6}),
    )
    lm = to_lm_engine_config(config)
    assert lm["layer_norm_epsilon"] == 1e-6
    back = from_lm_engine_config(lm)
    assert (back.gated_deltanet.norm_eps, back.mamba2.norm_eps, back.m2rnn.norm_eps) == (1e-6, 1e-6, 1e-5)
    twin = DecoderTorch(lm)
    assert twin.transformer.h[1].sequence_mixer.norm_eps == twin.transformer.h[2].sequence_mixer.norm_eps == 1e-6
    with pytest.raises(ValueError, match=r"mamba2.norm_eps: lm-engine uses layer_norm_epsilon=1e-05"):
        to_lm_engine_config(
            tiny_config("S").replace(mamba2=config.mamba2.__class__(**{**config.mamba2.__dict__, "norm_eps": 1e-6}))
        )


def test_our_fields_without_counterpart_are_errors():
    config = tiny_config("MR")
    with pytest.raises(ValueError, match=r"m2rnn.norm_eps: lm-engine fixes this norm's eps at 1e-05"):
        to_lm_engine_config(config.replace(m2rnn=config.m2rnn.__class__(num_heads=4, norm_eps=1e-6)))
    with pytest.raises(
        ValueError, match=r"m2rnn.query: lm-engine reads q from the projection \('token'\), got 'learned'"
    ):
        to_lm_engine_config(config.replace(m2rnn=config.m2rnn.__class__(num_heads=4, query="learned")))
    dense = tiny_config("A").replace(mlp=MLPConfig(intermediate_size=32))
    assert to_lm_engine_config(dense)["mlp_blocks"][0]["mlp_type"] == "MLP"
