"""Vector-state RNN baseline (SPEC §9.4) and the gated vector-RNN skeleton it shares with the GRU (``gru.py``).

Per head n (N heads of width d), with ``W`` (N, d, d) ~ N(0, σ) and no weight decay:

    h_t = tanh(h_{t-1} W + x_t),        y_t = h_t

Layer dataflow for x (B, S, h): ``input_projection`` h -> [x (N d) | gate inputs (GRU only) | g (N d)]; causal conv
(SiLU) on x only (or just SiLU when ``kernel_size`` is None); the recurrence (state in >= float32);
``y * SiLU(g)``; RMSNorm over all N d features; ``output_projection``.

State-gradient clipping (``gradient_clipping``, default 1) has the op's semantics (SPEC §0.1): walking backward,
the cotangent arriving at h_t from step t+1 (and the cotangent of the returned final state) is clamped to [-c, c]
before the output's own cotangent dy_t is added; the cotangent of the initial state is not clamped. The forward is
unaffected.

Parameters (Flax path -> lm-engine name; kernels stored transposed):

=========================  ===========================  =================  =====================  =================
Flax path                  lm-engine name               Flax shape         init                   logical axes
=========================  ===========================  =================  =====================  =================
input_projection.kernel    input_projection.weight      (h, (2 + k) N d)   N(0, σ)                (embed, None)
conv1d.kernel              conv1d.weight (Nd, 1, ks)    (ks, N d)          N(0, σ)                (None, None)
conv1d.bias                conv1d.bias                  (N d,)             zeros (add_bias)       (None,)
state_weight               state_weight                 ((1 + k) N, d, d)  N(0, σ)                (heads, None, None)
norm.scale                 norm.weight                  (N d,)             ones                   (heads,)
output_projection.kernel   output_projection.weight     (N d, h)           N(0, σ / sqrt(2 L))    (heads, embed)
=========================  ===========================  =================  =====================  =================

k = 0 for the RNN, 2 for the GRU (forget and reset gate inputs; ``state_weight`` stacks [W | W_f | W_r]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.conv import ACTIVATIONS, CausalDepthwiseConv1d
from m2rnn_jax.layers.documents import document_starts
from m2rnn_jax.layers.linear import output_projection_std, sharded_linear
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.validation import init_layer, require_positive_int
from m2rnn_jax.ops.clipping import clamp_cotangent, normalize_clipping
from m2rnn_jax.parallel.context.axis import context_axis_size
from m2rnn_jax.parallel.context.pipeline import context_recurrence
from m2rnn_jax.typing import Dtype


@dataclasses.dataclass(frozen=True)
class VectorRNNConfig:
    """Fields shared by the RNN and GRU baselines (400M: 85 heads of width 16; 7B: 128 heads)."""

    num_heads: int
    head_dim: int = 16
    kernel_size: int | None = 4
    activation_function: str | None = "silu"
    add_bias: bool = False
    gradient_clipping: float | None = 1.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        require_positive_int("num_heads", self.num_heads)
        require_positive_int("head_dim", self.head_dim)
        if self.kernel_size is not None:
            require_positive_int("kernel_size", self.kernel_size)
        if self.activation_function is not None and self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function: expected one of {sorted(ACTIVATIONS)} or None, got {self.activation_function!r}"
            )
        normalize_clipping(self.gradient_clipping)
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps}")


@dataclasses.dataclass(frozen=True)
class RNNConfig(VectorRNNConfig):
    """Hyper-parameters of the vector RNN baseline (lm-engine ``RNNArgs`` with all head counts equal)."""


class VectorRNNState(NamedTuple):
    """Decoding state: conv (B, kernel_size - 1, N d) raw pre-conv x inputs (None without conv); recurrent (B, N, d)."""

    conv: jax.Array | None
    recurrent: jax.Array


def clipped_recurrence(
    step: Callable[[jax.Array, tuple[jax.Array, ...]], jax.Array],
    h0: jax.Array,
    inputs: tuple[jax.Array, ...],
    gradient_clipping: float | None,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scan ``h_t = step(h_{t-1}, inputs_t)`` over time with the op's state-gradient clipping.

    inputs: arrays (B, S, ...); h0 (B, ...); reset (B, S) bool or None -> (every h_t stacked (B, S, ...), final
    state (B, ...)). ``y_t`` is the unclamped h_t; the carry handed to step t+1 (and returned as the final state)
    is ``clamp_cotangent(h_t)``, so the cotangent from the future is clamped before dy_t is added (SPEC §2.8).
    Where ``reset`` is set, the state entering the step is zero (a new document), and no cotangent flows back
    into the earlier document.
    """
    limit = normalize_clipping(gradient_clipping)

    def body(h, xs):
        inputs_t, reset_t = xs
        if reset_t is not None:
            h = jnp.where(reset_t.reshape(reset_t.shape + (1,) * (h.ndim - 1)), 0, h)
        h = step(h, inputs_t)
        return (h if limit is None else clamp_cotangent(h, limit)), h

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in inputs)
    final, hs = jax.lax.scan(body, h0, (time_major, None if reset is None else jnp.moveaxis(reset, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), final


class GatedVectorRNN(nnx.Module):
    """Shared skeleton of the RNN and GRU mixers: x (B, S, hidden) -> (y (B, S, hidden), VectorRNNState).

    Subclasses set ``num_gate_inputs`` (extra projected inputs per step, each N d wide, not convolved) and
    implement ``step(weights, h, inputs)`` where ``weights`` is ``state_weight`` split into ``1 + num_gate_inputs``
    blocks of (N, d, d). ``state=None`` starts from zeros and keeps the new state in ``promote_types(float32,
    dtype)``; a given state keeps its dtypes.
    """

    num_gate_inputs: ClassVar[int]

    def __init__(
        self,
        hidden_size: int,
        config: VectorRNNConfig,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        c = config
        width = c.num_heads * c.head_dim
        normal = jax.nn.initializers.normal
        self.input_projection = sharded_linear(
            hidden_size,
            (2 + self.num_gate_inputs) * width,
            ("embed", None),
            std=initializer_range,
            use_bias=c.add_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.conv1d = (
            None
            if c.kernel_size is None
            else CausalDepthwiseConv1d(
                width,
                c.kernel_size,
                activation=c.activation_function,
                use_bias=c.add_bias,
                initializer_range=initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )
        weight_shape = ((1 + self.num_gate_inputs) * c.num_heads, c.head_dim, c.head_dim)
        self.state_weight = nnx.Param(
            normal(initializer_range)(rngs.params(), weight_shape, param_dtype),
            out_sharding=("heads", None, None),
            eager_sharding=False,
            no_weight_decay=True,  # SPEC §9.5: the RNN/GRU state weights are in lm-engine's no-weight-decay group
        )
        self.norm = RMSNorm(width, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype, scale_sharding="heads")
        self.output_projection = sharded_linear(
            width,
            hidden_size,
            ("heads", "embed"),
            std=output_projection_std(initializer_range, num_layers),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def step(self, weights: tuple[jax.Array, ...], h: jax.Array, inputs: tuple[jax.Array, ...]) -> jax.Array:
        """One time step: h (B, N, d), weights (N, d, d) each, inputs (B, N, d) each -> new h (B, N, d)."""
        raise NotImplementedError

    def init_state(self, batch_size: int, max_length: int, dtype: Dtype = jnp.float32) -> VectorRNNState:
        """Zero state (``max_length`` is ignored: the state has a fixed size)."""
        c = self.config
        conv = None if self.conv1d is None else self.conv1d.init_state(batch_size, dtype=dtype)
        return VectorRNNState(conv=conv, recurrent=jnp.zeros((batch_size, c.num_heads, c.head_dim), dtype=dtype))

    def __call__(
        self, x: jax.Array, state: VectorRNNState | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, VectorRNNState]:
        """x (B, S, hidden) -> (y (B, S, hidden) in ``dtype``, new VectorRNNState).

        segment_ids: optional (B, S) document ids; each new document starts from a zero state and conv tail
        (:mod:`m2rnn_jax.layers.documents`).
        """
        c = self.config
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape (B, S, {self.hidden_size}), got {x.shape}")
        batch, seq_len, _ = x.shape
        compute_dtype = jnp.promote_types(jnp.float32, self.dtype)
        if state is None:
            state = self.init_state(batch, seq_len, dtype=compute_dtype)
        N, d = c.num_heads, c.head_dim

        blocks = jnp.split(self.input_projection(x.astype(self.dtype)), 2 + self.num_gate_inputs, axis=-1)
        inputs, g = blocks[:-1], blocks[-1]
        reset = None if segment_ids is None else document_starts(segment_ids, batch, seq_len)
        conv_state = state.conv
        if self.conv1d is not None:
            first, conv_state = self.conv1d(inputs[0], state.conv, segment_ids=segment_ids)
        elif c.activation_function is not None:
            first = ACTIVATIONS[c.activation_function](inputs[0].astype(compute_dtype))
        else:
            first = inputs[0]
        inputs = [t.astype(compute_dtype).reshape(batch, seq_len, N, d) for t in (first, *inputs[1:])]
        weights = tuple(jnp.split(self.state_weight[...].astype(compute_dtype), 1 + self.num_gate_inputs, axis=0))

        def recurrence(inputs, weights, h0, reset):
            step = lambda h, inputs_t: self.step(weights, h, inputs_t)  # noqa: E731
            return clipped_recurrence(step, h0, inputs, c.gradient_clipping, reset)

        h0 = state.recurrent.astype(compute_dtype)
        if context_axis_size() > 1:  # the sequence is split over devices: pipelined across the shards
            hs, recurrent = context_recurrence(recurrence, tuple(inputs), weights, h0, reset=reset, num_heads=N)
        else:
            hs, recurrent = recurrence(tuple(inputs), weights, h0, reset)
        y = hs.reshape(batch, seq_len, N * d) * jax.nn.silu(g.astype(compute_dtype))
        out = self.output_projection(self.norm(y))
        return out, VectorRNNState(conv=conv_state, recurrent=recurrent.astype(state.recurrent.dtype))


class RNN(GatedVectorRNN):
    """Vector RNN baseline: ``h_t = tanh(h_{t-1} W + x_t)`` per head (module docstring)."""

    num_gate_inputs = 0

    def step(self, weights, h, inputs):
        (W,), (x_t,) = weights, inputs
        return jnp.tanh(jnp.einsum("bnd,nde->bne", h, W) + x_t)
