"""Hyper-parameters of the hybrid decoder (SPEC §9-§10) as one frozen, validated dataclass.

A model is a stack of ``num_layers`` pre-norm blocks; ``layer_pattern`` names the sequence mixer of each block by
one letter (index 0 first), from the registry :data:`m2rnn_jax.models.mixers.MIXERS`:

=======  ==================  ====================================================
letter   config field        mixer
=======  ==================  ====================================================
``M``    ``m2rnn``           :class:`m2rnn_jax.layers.m2rnn.M2RNN`
``G``    ``gated_deltanet``  :class:`m2rnn_jax.layers.gated_deltanet.GatedDeltaNet`
``S``    ``mamba2``          :class:`m2rnn_jax.layers.mamba2.Mamba2`
``A``    ``attention``       :class:`m2rnn_jax.layers.attention.Attention`
``R``    ``rnn``             :class:`m2rnn_jax.layers.rnn.RNN`
``U``    ``gru``             :class:`m2rnn_jax.layers.gru.GRU`
=======  ==================  ====================================================

Every letter used by the pattern needs its config field set; fields of unused mixers must stay ``None`` (so a
config says exactly what it builds). The channel mixer of every block is ``mlp``: a dense SwiGLU
(:class:`~m2rnn_jax.layers.mlp.MLPConfig`) or a mixture of experts (:class:`~m2rnn_jax.layers.mlp.MoEConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNetConfig
from m2rnn_jax.layers.gru import GRUConfig
from m2rnn_jax.layers.m2rnn import M2RNNConfig
from m2rnn_jax.layers.mamba2 import Mamba2Config
from m2rnn_jax.layers.mlp import MLPConfig, MoEConfig
from m2rnn_jax.layers.rnn import RNNConfig
from m2rnn_jax.models.lm_head_loss import STATISTICS_CHOICES as HEAD_STATISTICS
from m2rnn_jax.models.mixers import MIXER_LETTERS, MIXERS, mixer_fields, mixer_spec

# What the LM head's logits GEMM writes (``head_logits``): float32, or the compute dtype.
HEAD_LOGITS = ("float32", "compute")

# Layer-pattern letter -> ModelConfig field holding that mixer's config (a view of the registry).
MIXER_FIELDS: dict[str, str] = {spec.letter: spec.field for spec in MIXERS}

CHANNEL_MIXER_CONFIG_TYPES: tuple[type, ...] = (MLPConfig, MoEConfig)

SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")

# ModelConfig.remat: what each block keeps for the backward pass (the policies live in models/decoder.py).
#   "none":      no rematerialisation; every intermediate of the forward pass is kept.
#   "full":      only the block inputs are kept; the whole block runs again in the backward pass.
#   "save_dots": the outputs of matmuls without batch dimensions (the linear projections) are kept; everything
#                else (norms, activations, convolutions, recurrences, attention) runs again.
REMAT_CHOICES: tuple[str, ...] = ("none", "full", "save_dots")

ChannelMixerConfig = MLPConfig | MoEConfig


def canonical_dtype_name(dtype: Any, field_name: str) -> str:
    """Returns the numpy name of ``dtype`` (a string or a dtype-like), one of :data:`SUPPORTED_DTYPES`."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"{field_name}: expected one of {SUPPORTED_DTYPES}, got {dtype!r}") from err
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"{field_name}: expected one of {SUPPORTED_DTYPES}, got {dtype!r}")
    return name


def canonical_remat(remat: str | bool) -> str:
    """``remat`` as one of :data:`REMAT_CHOICES` (``True`` -> "full", ``False`` -> "none")."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_CHOICES:
        raise ValueError(f"remat: expected one of {REMAT_CHOICES} (or True / False), got {remat!r}")
    return remat


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The hybrid decoder: embeddings -> ``num_layers`` pre-norm blocks -> final RMSNorm -> LM head.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: width h of the residual stream.
        num_layers: number of blocks L (also the depth used by depth-scaled output-projection init).
        layer_pattern: one mixer letter per block (see the module docstring), ``len == num_layers``.
        mlp: channel mixer of every block (SwiGLU :class:`MLPConfig` or :class:`MoEConfig`).
        m2rnn, gated_deltanet, mamba2, attention, rnn, gru: per-mixer configs; set exactly those the pattern uses.
        initializer_range: σ of the normal init of embeddings, LM head and input projections (SPEC §3.3, §9.1).
        norm_eps: epsilon of the block and final RMSNorms.
        tie_embeddings: reuse the embedding matrix as LM head (the paper's models are untied).
        dtype: compute dtype ("bfloat16" for training at scale).
        param_dtype: storage dtype of the parameters (float32 master weights).
        remat: activation checkpointing of each block, one of :data:`REMAT_CHOICES` ("none", "full",
            "save_dots"); ``True`` / ``False`` (older config files) are read as "full" / "none".
        head_statistics: how the chunked LM-head loss computes its softmax statistics and logits gradient, one
            of :data:`HEAD_STATISTICS`: "two_pass" (jnp, any backend), "pallas_gpu" (one fused statistics
            kernel), "one_read" (its one-read form: the logits read once, d logits written up to a row scale),
            "fused_matmul" (the logits GEMM with the statistics in its epilogue: no logits) or "auto" ("one_read"
            on NVIDIA GPUs, "two_pass" elsewhere; the paper presets' setting); the kernels run on NVIDIA GPUs, on
            one device or one token group (the jnp path otherwise: a kernel is an opaque custom call that XLA
            cannot split; :mod:`m2rnn_jax.models.lm_head_loss`).
        head_logits: the dtype the head's logits GEMM writes, one of :data:`HEAD_LOGITS`: "float32" (default), or
            "compute" (the compute dtype: each logit rounded once, as the plain ``hidden @ kernel`` in bfloat16 and
            PyTorch's autocast give them; half the bytes the statistics read; the softmax stays float32; the paper
            presets' setting). ``head_statistics="fused_matmul"`` writes no logits and does not read it.
        scan_layers: run each run of consecutive blocks with the same mixer letter as one ``jax.lax.scan`` over
            their stacked parameters (compiled once per run instead of once per block), and each *period*, a
            sequence of runs repeated back to back (the 7B hybrid's ``AGGGGGGG`` x 4), as one scan over its
            repetitions whose body applies the period's runs in order (compiled once for all repetitions); the
            segments are :func:`~m2rnn_jax.models.layer_scan.layer_plan`'s. The parameter tree is unchanged
            (:mod:`m2rnn_jax.models.layer_scan`). False: every block unrolled.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_pattern: str
    mlp: ChannelMixerConfig
    m2rnn: M2RNNConfig | None = None
    gated_deltanet: GatedDeltaNetConfig | None = None
    mamba2: Mamba2Config | None = None
    attention: AttentionConfig | None = None
    rnn: RNNConfig | None = None
    gru: GRUConfig | None = None
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str | bool = "none"
    head_statistics: str = "two_pass"
    head_logits: str = "float32"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self._validate_pattern()
        self._validate_mixer_configs()
        if not isinstance(self.mlp, CHANNEL_MIXER_CONFIG_TYPES):
            raise ValueError(f"mlp: expected MLPConfig or MoEConfig, got {type(self.mlp).__name__}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range: expected > 0, got {self.initializer_range!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps!r}")
        object.__setattr__(self, "dtype", canonical_dtype_name(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype_name(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "remat", canonical_remat(self.remat))
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers: expected True or False, got {self.scan_layers!r}")
        if self.head_statistics not in HEAD_STATISTICS:
            raise ValueError(f"head_statistics: expected one of {HEAD_STATISTICS}, got {self.head_statistics!r}")
        if self.head_logits not in HEAD_LOGITS:
            raise ValueError(f"head_logits: expected one of {HEAD_LOGITS}, got {self.head_logits!r}")

    def _validate_pattern(self) -> None:
        if not isinstance(self.layer_pattern, str):
            raise ValueError(f"layer_pattern: expected a string, got {type(self.layer_pattern).__name__}")
        unknown = sorted(set(self.layer_pattern) - set(MIXER_LETTERS))
        if unknown:
            raise ValueError(
                f"layer_pattern: expected letters from {MIXER_LETTERS}, got unknown letters {unknown} in "
                f"{self.layer_pattern!r}"
            )
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(
                f"layer_pattern: expected {self.num_layers} letters (num_layers), "
                f"got {len(self.layer_pattern)} in {self.layer_pattern!r}"
            )

    def _validate_mixer_configs(self) -> None:
        used = mixer_fields(self.layer_pattern)
        for spec in MIXERS:
            name, value = spec.field, getattr(self, spec.field)
            if name in used and value is None:
                raise ValueError(
                    f"{name}: expected a {spec.config_class.__name__} (the layer_pattern uses {spec.letter}), got None"
                )
            if name not in used and value is not None:
                raise ValueError(
                    f"{name}: expected None (the layer_pattern {self.layer_pattern!r} does not use {spec.letter}), "
                    f"got {type(value).__name__}"
                )
            if value is not None and not isinstance(value, spec.config_class):
                raise ValueError(f"{name}: expected {spec.config_class.__name__}, got {type(value).__name__}")
        attention = self.attention
        if attention is not None and attention.head_dim is None and self.hidden_size % attention.num_heads:
            raise ValueError(
                f"attention.num_heads: expected a divisor of hidden_size={self.hidden_size} when "
                f"attention.head_dim is None, got {attention.num_heads}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a jnp dtype."""
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        """``param_dtype`` as a jnp dtype."""
        return jnp.dtype(self.param_dtype)

    def mixer_config(self, letter: str) -> Any:
        """The config of the mixer that ``letter`` names in the layer pattern."""
        return getattr(self, mixer_spec(letter).field)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
