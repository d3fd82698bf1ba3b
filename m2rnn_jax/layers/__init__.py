"""Flax NNX layers: sequence mixers and their shared building blocks."""

from m2rnn_jax.layers.attention import Attention, AttentionConfig, AttentionState
from m2rnn_jax.layers.conv import CausalDepthwiseConv1d
from m2rnn_jax.layers.decay_gate import SoftplusDecayGate
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetState
from m2rnn_jax.layers.gru import GRU, GRUConfig
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig, M2RNNState
from m2rnn_jax.layers.mamba2 import Mamba2, Mamba2Config, Mamba2State
from m2rnn_jax.layers.mlp import MLP, MLPConfig, MoE, MoEConfig
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.rnn import RNN, RNNConfig, VectorRNNState

__all__ = ["CausalDepthwiseConv1d", "M2RNN", "M2RNNConfig", "M2RNNState", "RMSNorm", "SoftplusDecayGate"]
__all__ += ["Attention", "AttentionConfig", "AttentionState", "GatedDeltaNet", "GatedDeltaNetConfig"]
__all__ += ["GatedDeltaNetState", "GRU", "GRUConfig", "Mamba2", "Mamba2Config", "Mamba2State", "MLP", "MLPConfig"]
__all__ += ["MoE", "MoEConfig", "RNN", "RNNConfig", "VectorRNNState"]
