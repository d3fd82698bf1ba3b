"""The one registry of sequence mixers: layer-pattern letter -> (config field, config class, module class).

:class:`~m2rnn_jax.models.config.ModelConfig` validates its pattern and mixer fields against it, the decoder builds
its blocks from it, counting and the presets read it. Every module class implements
:class:`~m2rnn_jax.layers.mixer.SequenceMixer`. Adding a mixer: write its layer (config dataclass + module), add a
:class:`MixerSpec` to :data:`MIXERS` and a field of the same name to ``ModelConfig`` (``tests/models`` checks
that the two agree).
"""

from __future__ import annotations

import dataclasses

from m2rnn_jax.layers.attention import Attention, AttentionConfig
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from m2rnn_jax.layers.gru import GRU, GRUConfig
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig
from m2rnn_jax.layers.mamba2 import Mamba2, Mamba2Config
from m2rnn_jax.layers.rnn import RNN, RNNConfig


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """One sequence mixer.

    Attributes:
      letter: its letter in ``ModelConfig.layer_pattern``.
      field: the ``ModelConfig`` field that holds its config.
      config_class: the type of that config.
      module_class: the layer (a :class:`~m2rnn_jax.layers.mixer.SequenceMixer`).
      kv_cache: True when its decoding state grows with the tokens (attention's KV cache) instead of having a fixed
        size.
    """

    letter: str
    field: str
    config_class: type
    module_class: type
    kv_cache: bool = False


MIXERS: tuple[MixerSpec, ...] = (
    MixerSpec("M", "m2rnn", M2RNNConfig, M2RNN),
    MixerSpec("G", "gated_deltanet", GatedDeltaNetConfig, GatedDeltaNet),
    MixerSpec("S", "mamba2", Mamba2Config, Mamba2),
    MixerSpec("A", "attention", AttentionConfig, Attention, kv_cache=True),
    MixerSpec("R", "rnn", RNNConfig, RNN),
    MixerSpec("U", "gru", GRUConfig, GRU),
)

MIXER_BY_LETTER: dict[str, MixerSpec] = {spec.letter: spec for spec in MIXERS}
MIXER_LETTERS: str = "".join(MIXER_BY_LETTER)


def mixer_spec(letter: str) -> MixerSpec:
    """The :class:`MixerSpec` of pattern letter ``letter``."""
    if letter not in MIXER_BY_LETTER:
        raise ValueError(f"letter: expected one of {MIXER_LETTERS}, got {letter!r}")
    return MIXER_BY_LETTER[letter]


def mixer_fields(pattern: str) -> set[str]:
    """The ``ModelConfig`` fields of the mixers that ``pattern`` uses (letters checked)."""
    return {mixer_spec(letter).field for letter in pattern}
