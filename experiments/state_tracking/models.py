"""The models of the state-tracking comparison: one decoder per sequence mixer, the same residual stream.

Every variant is ``num_layers`` blocks of one mixer type with the same width h, the same SwiGLU (2h) and the same
vocabulary (the group's elements), so the models differ only in their sequence mixer. Choices shared by all
recurrent mixers where the layer allows it: no short convolution (with a 4-tap conv the first positions are solvable
without the recurrence, a shortcut that stalled learning in the M2RNN sweep of experiments/RESULTS.md; Gated DeltaNet
and Mamba2 always have one, kernel size 4 as in their language models). The M2RNN variant is the tuned
``state-tracking-*`` preset model (:func:`m2rnn_jax.train.presets.state_tracking_model`), whose state weight W is drawn
from N(0, 1.6 / sqrt(V)) = N(0, :data:`TANH_RNN_INIT`) at V=64, as the GRU's and RNN's are, not the identity (on the
CPU recipe W ~ N(0, 0.2) learned S3 on 4 of 4 seeds in ~2x fewer steps than the identity, which learned 3 of 4:
SEARCH.md, "S3 in the comparison");
the other mixers use their library defaults plus the per-mixer sizes below, except that GRU and RNN, tanh recurrences
like M2RNN, get its larger init (:data:`TANH_RNN_INIT`):

==========  =============================================================  ============================
name        mixer                                                          recurrent state per layer
==========  =============================================================  ============================
m2rnn       M2RNN, 4 heads K=2 x V=64 (init 0.2, W ~ N(0, 0.2), short f)   4 * 2 * 64 = 512
gru         GRU, 2 heads of width h/2                                      h
rnn         vector tanh RNN, 2 heads of width h/2                          h
gdn         Gated DeltaNet, eigenvalues of (I - beta k k^T) in [0, 1]      2 * 64 * 64 = 8192
gdn-neg     Gated DeltaNet with ``allow_neg_eigval`` (eigenvalues [-1, 1])  2 * 64 * 64 = 8192
mamba2      Mamba2, 4 heads, I = 2h, N = 64                                2h * 64
attention   softmax attention with RoPE, 4 heads of h/4                    (KV cache, grows with length)
==========  =============================================================  ============================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from m2rnn_jax.data.state_tracking import get_group
from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNetConfig
from m2rnn_jax.layers.gru import GRUConfig
from m2rnn_jax.layers.mamba2 import Mamba2Config
from m2rnn_jax.layers.mlp import MLPConfig
from m2rnn_jax.layers.rnn import RNNConfig
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.train.presets import state_tracking_model

# The init of the tanh recurrences (M2RNN, GRU, RNN): large enough that the recurrence uses the tanh from the first
# step (with the language-model default 0.02 the CPU recipe's GRU stayed at 33% on S3, with 0.2 it reached 100%).
TANH_RNN_INIT = 0.2


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Width h and depth L shared by every variant; ``dtype`` the compute dtype."""

    hidden_size: int = 64
    num_layers: int = 2
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % 8 != 0 or self.hidden_size < 8:
            raise ValueError(f"hidden_size: expected a positive multiple of 8, got {self.hidden_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {self.num_layers}")


def _decoder(group: str, size: ModelSize, letter: str, field: str, mixer: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=get_group(group).order,
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        layer_pattern=letter * size.num_layers,
        mlp=MLPConfig(intermediate_size=2 * size.hidden_size),
        dtype=size.dtype,
        **{field: mixer},
    )


def _m2rnn(group: str, size: ModelSize) -> ModelConfig:
    return state_tracking_model(
        group,
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=4,
        k_head_dim=2,
        v_head_dim=64,
        intermediate_size=2 * size.hidden_size,
        dtype=size.dtype,
    )


def _gru(group: str, size: ModelSize) -> ModelConfig:
    mixer = GRUConfig(num_heads=2, head_dim=size.hidden_size // 2, kernel_size=None)
    return _decoder(group, size, "U", "gru", mixer).replace(initializer_range=TANH_RNN_INIT)


def _rnn(group: str, size: ModelSize) -> ModelConfig:
    mixer = RNNConfig(num_heads=2, head_dim=size.hidden_size // 2, kernel_size=None)
    return _decoder(group, size, "R", "rnn", mixer).replace(initializer_range=TANH_RNN_INIT)


def _gdn(allow_neg_eigval: bool) -> Callable[[str, ModelSize], ModelConfig]:
    def build(group: str, size: ModelSize) -> ModelConfig:
        mixer = GatedDeltaNetConfig(num_heads=2, k_head_dim=64, v_head_dim=64, allow_neg_eigval=allow_neg_eigval)
        return _decoder(group, size, "G", "gated_deltanet", mixer)

    return build


def _mamba2(group: str, size: ModelSize) -> ModelConfig:
    mixer = Mamba2Config(num_heads=4, intermediate_size=2 * size.hidden_size, state_size=64)
    return _decoder(group, size, "S", "mamba2", mixer)


def _attention(group: str, size: ModelSize) -> ModelConfig:
    mixer = AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=size.hidden_size // 4, position_embedding="rope")
    return _decoder(group, size, "A", "attention", mixer)


# name -> (label for plots and tables, builder(group, size) -> ModelConfig); the order is the order of the figure.
MODELS: dict[str, tuple[str, Callable[[str, ModelSize], ModelConfig]]] = {
    "m2rnn": ("M2RNN", _m2rnn),
    "gru": ("GRU", _gru),
    "rnn": ("RNN", _rnn),
    "gdn": ("Gated DeltaNet [0, 1]", _gdn(False)),
    "gdn-neg": ("Gated DeltaNet [-1, 1]", _gdn(True)),
    "mamba2": ("Mamba2", _mamba2),
    "attention": ("Attention (RoPE)", _attention),
}


def model_label(name: str) -> str:
    """The label of model ``name`` in plots and tables."""
    return MODELS[name][0] if name in MODELS else name


def model_config(name: str, group: str, size: ModelSize) -> ModelConfig:
    """The decoder of variant ``name`` (a key of :data:`MODELS`) for ``group`` at ``size``."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {name!r}")
    return MODELS[name][1](group, size)
