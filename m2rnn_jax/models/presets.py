"""Named model configs: every 400M and 7B variant of SPEC §10.2, tiny CPU models, and a registry.

Paper presets are ``<variant>-<size>`` with size ``400m`` or ``7b`` and variant one of

- ``m2rnn``, ``gdn``, ``mamba2``, ``rnn``, ``gru``: one mixer in every layer;
- ``attention``: softmax attention in every layer, with RoPE (the only RoPE model; SPEC §9.1);
- ``hybrid-m2rnn``, ``hybrid-gdn``, ``hybrid-mamba2``: that mixer with NoPE attention at layers 4, 12, 20 (, 28, 36);
- ``hybrid-gdn-m2rnn-1l``, ``hybrid-mamba2-m2rnn-1l``: the hybrid with M2RNN as layer 0;
- ``hybrid-gdn-m2rnn-3l`` / ``-5l`` (400m / 7b), same for mamba2: M2RNN right before every attention layer.

This is the one preset registry. Other modules add presets with :func:`register_preset`: the training presets of
:mod:`m2rnn_jax.train.presets` register their models here when that module is imported, and the CLI looks every
name up through that module (models never import ``train``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any

from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNetConfig
from m2rnn_jax.layers.gru import GRUConfig
from m2rnn_jax.layers.m2rnn import M2RNNConfig
from m2rnn_jax.layers.mamba2 import Mamba2Config
from m2rnn_jax.layers.mlp import MLPConfig, MoEConfig
from m2rnn_jax.layers.rnn import RNNConfig
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.mixers import mixer_fields

PAPER_VOCAB_SIZE = 100352


@dataclasses.dataclass(frozen=True)
class Preset:
    """A registered preset: ``factory()`` builds its :class:`ModelConfig`."""

    name: str
    description: str
    factory: Callable[[], ModelConfig]


_REGISTRY: dict[str, Preset] = {}


def register_preset(
    name: str, factory: Callable[[], ModelConfig], description: str = "", *, overwrite: bool = False
) -> None:
    """Adds a preset named ``name`` whose config is ``factory()`` (called on every :func:`get_preset`)."""
    if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
        raise ValueError(f"name: expected a non-empty string without whitespace, got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory: expected a callable returning ModelConfig, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: a preset named {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = Preset(name=name, description=description, factory=factory)


def list_presets() -> list[str]:
    """Names of every registered preset, in registration order."""
    return list(_REGISTRY)


def _lookup(name: str) -> Preset:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `m2rnn-jax info --list` lists them"
        raise ValueError(f"name: unknown preset {name!r}{hint}")
    return _REGISTRY[name]


def get_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of the preset ``name``."""
    config = _lookup(name).factory()
    if not isinstance(config, ModelConfig):
        raise ValueError(f"name: the factory of preset {name!r} returned {type(config).__name__}, not ModelConfig")
    return config


def preset_description(name: str) -> str:
    """The one-line description of the preset ``name``."""
    return _lookup(name).description


# ---------------------------------------------------------------------------------------------------------------
# Paper configurations (SPEC §10.1)


@dataclasses.dataclass(frozen=True)
class PaperScale:
    """What the variants of one model size share (SPEC §10.1)."""

    hidden_size: int
    num_layers: int
    attention_layers: tuple[int, ...]
    mixers: dict[str, Any]  # ModelConfig field (models/mixers.py) -> that mixer's config at this size
    mlp: MLPConfig | MoEConfig


def _paper_scales() -> dict[str, PaperScale]:
    return {
        "400m": PaperScale(
            hidden_size=1024,
            num_layers=24,
            attention_layers=(4, 12, 20),
            mixers={
                "m2rnn": M2RNNConfig(num_heads=84),
                "gated_deltanet": GatedDeltaNetConfig(num_heads=2, k_head_dim=256, v_head_dim=512),
                "mamba2": Mamba2Config(num_heads=64, intermediate_size=1216, state_size=216),
                "rnn": RNNConfig(num_heads=85, head_dim=16),
                "gru": GRUConfig(num_heads=85, head_dim=16),
                "attention": AttentionConfig(num_heads=16, num_kv_heads=16, head_dim=64),
            },
            mlp=MLPConfig(intermediate_size=2752),
        ),
        "7b": PaperScale(
            hidden_size=1536,
            num_layers=40,
            attention_layers=(4, 12, 20, 28, 36),
            mixers={
                "m2rnn": M2RNNConfig(num_heads=132),
                "gated_deltanet": GatedDeltaNetConfig(num_heads=3, k_head_dim=256, v_head_dim=512),
                "mamba2": Mamba2Config(num_heads=32, intermediate_size=2048, state_size=192),
                "rnn": RNNConfig(num_heads=128, head_dim=16),
                "gru": GRUConfig(num_heads=128, head_dim=16),
                "attention": AttentionConfig(num_heads=24, num_kv_heads=24, head_dim=64),
            },
            mlp=MoEConfig(
                num_experts=128,
                top_k=8,
                intermediate_size=256,
                shared_intermediate_size=1024,
                router_aux_loss_coef=0.001,
            ),
        ),
    }


def hybrid_pattern(
    num_layers: int, mixer: str, attention_layers: tuple[int, ...], m2rnn_layers: tuple[int, ...] = ()
) -> str:
    """A layer pattern of ``mixer`` letters with ``A`` at ``attention_layers`` and ``M`` at ``m2rnn_layers``."""
    letters = [mixer] * num_layers
    for index in attention_layers:
        letters[index] = "A"
    for index in m2rnn_layers:
        letters[index] = "M"
    return "".join(letters)


def _paper_config(scale: PaperScale, pattern: str, *, rope: bool = False) -> ModelConfig:
    mixers = {name: scale.mixers[name] for name in mixer_fields(pattern)}
    if rope:
        mixers["attention"] = dataclasses.replace(scale.mixers["attention"], position_embedding="rope")
    return ModelConfig(
        vocab_size=PAPER_VOCAB_SIZE,
        hidden_size=scale.hidden_size,
        num_layers=scale.num_layers,
        layer_pattern=pattern,
        mlp=scale.mlp,
        dtype="bfloat16",
        param_dtype="float32",
        head_logits="compute",  # bf16 logits: the plain bf16 head's loss, -3 ms a step (RESULTS.md session 16)
        head_statistics="auto",  # one_read on NVIDIA GPUs: the head 3.1 ms faster than pallas_gpu (session 18)
        **mixers,
    )


def _paper_variants(scale: PaperScale) -> dict[str, tuple[str, str]]:
    """Variant name -> (description, layer pattern) at one model size (SPEC §10.2)."""
    layers, attention = scale.num_layers, scale.attention_layers
    before_attention = tuple(index - 1 for index in attention)
    num_m2rnn = len(before_attention)
    return {
        "m2rnn": ("M2RNN in every layer", "M" * layers),
        "gdn": ("Gated DeltaNet in every layer", "G" * layers),
        "mamba2": ("Mamba2 in every layer", "S" * layers),
        "rnn": ("vector RNN in every layer", "R" * layers),
        "gru": ("GRU in every layer", "U" * layers),
        "attention": ("softmax attention (RoPE) in every layer", "A" * layers),
        "hybrid-m2rnn": ("M2RNN + NoPE attention hybrid", hybrid_pattern(layers, "M", attention)),
        "hybrid-gdn": ("Gated DeltaNet + NoPE attention hybrid", hybrid_pattern(layers, "G", attention)),
        "hybrid-gdn-m2rnn-1l": ("hybrid GDN with M2RNN as layer 0", hybrid_pattern(layers, "G", attention, (0,))),
        f"hybrid-gdn-m2rnn-{num_m2rnn}l": (
            "hybrid GDN with M2RNN right before each attention layer",
            hybrid_pattern(layers, "G", attention, before_attention),
        ),
        "hybrid-mamba2": ("Mamba2 + NoPE attention hybrid", hybrid_pattern(layers, "S", attention)),
        "hybrid-mamba2-m2rnn-1l": (
            "hybrid Mamba2 with M2RNN as layer 0",
            hybrid_pattern(layers, "S", attention, (0,)),
        ),
        f"hybrid-mamba2-m2rnn-{num_m2rnn}l": (
            "hybrid Mamba2 with M2RNN right before each attention layer",
            hybrid_pattern(layers, "S", attention, before_attention),
        ),
    }


def _register_paper_presets() -> None:
    for size, scale in _paper_scales().items():
        for variant, (description, pattern) in _paper_variants(scale).items():
            register_preset(
                f"{variant}-{size}",
                functools.partial(_paper_config, scale, pattern, rope=variant == "attention"),
                f"{description}, paper {size.upper()} ({scale.num_layers} layers, h={scale.hidden_size})",
            )


# ---------------------------------------------------------------------------------------------------------------
# Tiny CPU presets (tests, demos)

_TINY_MIXERS = dict(
    m2rnn=M2RNNConfig(num_heads=4, k_head_dim=16, v_head_dim=8),
    gated_deltanet=GatedDeltaNetConfig(num_heads=2, k_head_dim=16, v_head_dim=32, chunk_size=8),
    mamba2=Mamba2Config(num_heads=4, intermediate_size=64, state_size=16, chunk_size=8),
    attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
    rnn=RNNConfig(num_heads=4, head_dim=16),
    gru=GRUConfig(num_heads=4, head_dim=16),
)


def tiny_config(pattern: str, *, moe: bool = False, vocab_size: int = 256, hidden_size: int = 64) -> ModelConfig:
    """A small float32 model for CPU tests with the given layer pattern (all six mixers available)."""
    used = mixer_fields(pattern)
    mlp = (
        MoEConfig(num_experts=4, top_k=2, intermediate_size=32, shared_intermediate_size=64, router_aux_loss_coef=0.01)
        if moe
        else MLPConfig(intermediate_size=128)
    )
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=len(pattern),
        layer_pattern=pattern,
        mlp=mlp,
        **{name: config for name, config in _TINY_MIXERS.items() if name in used},
    )


def _register_tiny_presets() -> None:
    register_preset("tiny-hybrid", lambda: tiny_config("MGSARU"), "tiny CPU model with every mixer type (MGSARU)")
    register_preset(
        "tiny-hybrid-moe", lambda: tiny_config("MGSARU", moe=True), "tiny CPU model, every mixer type, MoE MLPs"
    )
    register_preset("tiny-m2rnn", lambda: tiny_config("MMAM"), "tiny CPU M2RNN + attention hybrid (MMAM)")


_register_paper_presets()
_register_tiny_presets()
