"""The paper's 400M layer patterns (SPEC §10.2) shrunk to ~30M parameters with equal mixer budgets.

Depth 24 -> 12, width 1024 -> 384; attention at layers 2, 6, 10 (the 400M model's 4, 12, 20 scaled); M2RNN as
layer 0 (1L) or right before each attention layer (3L). Every mixer has ~0.6M parameters per layer, as the paper
matches its mixers at 400M (M2RNN 32 heads of K=64, V=16; GDN 2 heads of dk=128, dv=192; attention 6 heads of 64).
"""

from __future__ import annotations

import dataclasses

from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNetConfig
from m2rnn_jax.layers.m2rnn import M2RNNConfig
from m2rnn_jax.layers.mlp import MLPConfig
from m2rnn_jax.models.config import MIXER_FIELDS, ModelConfig
from m2rnn_jax.models.presets import hybrid_pattern

HIDDEN_SIZE = 384
NUM_LAYERS = 12
ATTENTION_LAYERS = (2, 6, 10)
MIXERS = {
    "m2rnn": M2RNNConfig(num_heads=32),
    "gated_deltanet": GatedDeltaNetConfig(num_heads=2, k_head_dim=128, v_head_dim=192),
    "attention": AttentionConfig(num_heads=6, num_kv_heads=6, head_dim=64),
}
PATTERNS = {
    "attention": "A" * NUM_LAYERS,
    "m2rnn": "M" * NUM_LAYERS,
    "gdn": "G" * NUM_LAYERS,
    "hybrid-m2rnn": hybrid_pattern(NUM_LAYERS, "M", ATTENTION_LAYERS),
    "hybrid-gdn": hybrid_pattern(NUM_LAYERS, "G", ATTENTION_LAYERS),
    "hybrid-gdn-m2rnn-1l": hybrid_pattern(NUM_LAYERS, "G", ATTENTION_LAYERS, (0,)),
    "hybrid-gdn-m2rnn-3l": hybrid_pattern(NUM_LAYERS, "G", ATTENTION_LAYERS, tuple(i - 1 for i in ATTENTION_LAYERS)),
}
# The paper's 400M WikiText perplexities (SPEC §11), for orientation beside ours.
PAPER_PERPLEXITY_400M = {
    "hybrid-gdn-m2rnn-3l": 21.26,
    "hybrid-gdn-m2rnn-1l": 21.39,
    "hybrid-m2rnn": 21.53,
    "hybrid-gdn": 21.89,
    "gdn": 22.70,
    "m2rnn": 22.92,
    "attention": 23.32,
}


def small_config(variant: str, vocab_size: int) -> ModelConfig:
    """The ~30M-parameter model of ``variant`` (a key of :data:`PATTERNS`), bf16 compute, float32 params."""
    if variant not in PATTERNS:
        raise ValueError(f"variant: expected one of {sorted(PATTERNS)}, got {variant!r}")
    pattern = PATTERNS[variant]
    used = {MIXER_FIELDS[letter] for letter in pattern}
    mixers = {name: config for name, config in MIXERS.items() if name in used}
    if variant == "attention":  # the all-attention baseline uses RoPE, the hybrids NoPE (as the paper)
        mixers["attention"] = dataclasses.replace(MIXERS["attention"], position_embedding="rope")
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_layers=NUM_LAYERS,
        layer_pattern=pattern,
        mlp=MLPConfig(intermediate_size=1024),
        dtype="bfloat16",
        param_dtype="float32",
        **mixers,
    )
