"""Flax NNX layers: sequence mixers and their shared building blocks."""

from m2rnn_jax.layers.conv import CausalDepthwiseConv1d
from m2rnn_jax.layers.decay_gate import SoftplusDecayGate
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig, M2RNNState
from m2rnn_jax.layers.norm import RMSNorm

__all__ = ["CausalDepthwiseConv1d", "M2RNN", "M2RNNConfig", "M2RNNState", "RMSNorm", "SoftplusDecayGate"]
