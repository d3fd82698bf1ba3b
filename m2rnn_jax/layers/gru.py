"""GRU baseline (SPEC §9.4): the gated vector-RNN skeleton of ``rnn.py`` with forget and reset gates.

Per head n (N heads of width d), with ``state_weight`` (3N, d, d) = [W | W_f | W_r] ~ N(0, σ), no weight decay,
and the projection split [x | x_f | x_r | g] (only x goes through the causal conv):

    f_t = σ(h_{t-1} W_f + x_f,t),   r_t = σ(h_{t-1} W_r + x_r,t),
    z_t = tanh((h_{t-1} ⊙ r_t) W + x_t),   h_t = f_t h_{t-1} + (1 - f_t) z_t,   y_t = h_t

The output path, state-gradient clipping (default 1, the op's semantics) and parameter names are those of
:mod:`m2rnn_jax.layers.rnn` (with k = 2 gate inputs): about 1.7x the mixer parameters of the RNN
(7.04M per layer at 400M).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m2rnn_jax.layers.rnn import GatedVectorRNN, VectorRNNConfig


@dataclasses.dataclass(frozen=True)
class GRUConfig(VectorRNNConfig):
    """Hyper-parameters of the GRU baseline (lm-engine ``GRUArgs`` with all head counts equal)."""


class GRU(GatedVectorRNN):
    """GRU mixer: x (B, S, hidden) -> (y (B, S, hidden), VectorRNNState) (module docstring)."""

    num_gate_inputs = 2

    def step(self, weights, h, inputs):
        W, W_f, W_r = weights
        x_t, x_f, x_r = inputs
        forget = jax.nn.sigmoid(jnp.einsum("bnd,nde->bne", h, W_f) + x_f)
        reset = jax.nn.sigmoid(jnp.einsum("bnd,nde->bne", h, W_r) + x_r)
        candidate = jnp.tanh(jnp.einsum("bnd,nde->bne", h * reset, W) + x_t)
        return forget * h + (1.0 - forget) * candidate
