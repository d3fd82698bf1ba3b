"""Causal depthwise 1-D convolution over time with a decoding state (SPEC §3.2 step 4, §8).

``y[t, c] = act(sum_j kernel[j, c] * x[t - (kernel_size - 1) + j, c] + bias[c])``: taps ordered oldest -> newest,
zero left padding (or the carried state) before the first token. The state is the last ``kernel_size - 1`` raw
(pre-conv) inputs, so running a sequence in pieces while carrying the state equals running it at once.
With ``segment_ids`` (documents, :mod:`m2rnn_jax.layers.documents`) taps that reach into an earlier document read
zeros, and the returned state keeps only inputs of the last document.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.documents import document_index
from m2rnn_jax.parallel.context.axis import context_axis_size
from m2rnn_jax.parallel.context.mixers import causal_conv_over_context
from m2rnn_jax.typing import Dtype

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"silu": jax.nn.silu}


class CausalDepthwiseConv1d(nnx.Module):
    """Depthwise causal conv with parameters ``kernel`` (kernel_size, C) and optional ``bias`` (C,).

    lm-engine stores ``conv1d.weight`` as (C, 1, kernel_size): ``kernel = weight[:, 0, :].T``.
    The convolution and the activation run in ``promote_types(float32, dtype)``; the output is cast to ``dtype``.

    Args:
        channels: C.
        kernel_size: number of taps (>= 1).
        activation: ``"silu"`` or ``None`` (identity), applied after the bias.
        use_bias: add a learnable bias (zeros at init).
        initializer_range: std of the N(0, std) kernel init.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        activation: str | None = "silu",
        use_bias: bool = False,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels <= 0:
            raise ValueError(f"channels: expected a positive value, got {channels}")
        if kernel_size <= 0:
            raise ValueError(f"kernel_size: expected a positive value, got {kernel_size}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or None, got {activation!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=initializer_range)
        self.kernel = nnx.Param(
            init(rngs.params(), (kernel_size, channels), param_dtype), out_sharding=(None, None), eager_sharding=False
        )
        self.bias = (
            nnx.Param(jnp.zeros((channels,), dtype=param_dtype), out_sharding=(None,), eager_sharding=False)
            if use_bias
            else None
        )

    def init_state(self, batch_size: int, dtype: Dtype = jnp.float32) -> jax.Array:
        """Zero state (B, kernel_size - 1, C): the conv of a sequence's first tokens sees zero padding."""
        return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype=dtype)

    def __call__(
        self, x: jax.Array, state: jax.Array | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x (B, S, C), state (B, kernel_size - 1, C) or None -> (y (B, S, C) in ``dtype``, new state).

        The new state holds the last ``kernel_size - 1`` raw inputs of ``[state, x]`` in the state's dtype
        (``x.dtype`` when ``state`` is None). ``segment_ids`` (B, S): document ids; a tap whose input lies in an
        earlier document than its output reads zero (the state counts as the document at position 0), and state
        entries outside the last document are zero.
        """
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"x: expected shape (B, S, {self.channels}), got {x.shape}")
        if context_axis_size() > 1:  # the sequence is split over devices: halo exchange between the shards
            return causal_conv_over_context(self, x, state, segment_ids=segment_ids)
        batch, seq_len, _ = x.shape
        if state is None:
            state = self.init_state(batch, dtype=x.dtype)
        expected_state = (batch, self.kernel_size - 1, self.channels)
        if state.shape != expected_state:
            raise ValueError(f"state: expected shape {expected_state}, got {state.shape}")

        padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # (B, S + kernel_size - 1, C)
        new_state = padded[:, seq_len:]
        compute_dtype = jnp.promote_types(jnp.float32, self.dtype)
        window = padded.astype(compute_dtype)
        kernel = self.kernel[...].astype(compute_dtype)
        taps = [window[:, j : j + seq_len] * kernel[j] for j in range(self.kernel_size)]
        if segment_ids is not None:
            document = document_index(segment_ids, batch, seq_len)  # (B, S)
            padded_document = jnp.pad(document, ((0, 0), (self.kernel_size - 1, 0)))  # the state is document 0
            taps = [
                jnp.where((padded_document[:, j : j + seq_len] == document)[..., None], tap, 0)
                for j, tap in enumerate(taps)
            ]
            in_last_document = padded_document[:, seq_len:] == document[:, -1:]
            new_state = jnp.where(in_last_document[..., None], new_state, 0)
        y = sum(taps)
        if self.bias is not None:
            y = y + self.bias[...].astype(compute_dtype)
        if self.activation is not None:
            y = ACTIVATIONS[self.activation](y)
        new_state = new_state.astype(state.dtype)
        return y.astype(self.dtype), new_state
