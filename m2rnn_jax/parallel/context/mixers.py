"""The layers' entry points under a context axis: short conv, gated delta rule, SSD and attention on global arrays.

Each opens the ``shard_map`` (:func:`~m2rnn_jax.parallel.context.shard.run_over_context`) around the function of
local shards that does the cross-shard work (:mod:`.conv`: halo exchange; :mod:`.linear_recurrence`: per-shard
(transition, state) pairs combined over the axis; :mod:`.attention`: K/V blocks passed around a ring), and takes
and returns what the single-device call does. :mod:`.conv` and :mod:`.attention` import layer modules, so they are
imported when first called (the layers import this module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from m2rnn_jax.parallel.context.axis import CONTEXT_AXIS
from m2rnn_jax.parallel.context.linear_recurrence import context_gated_delta_rule, context_ssd
from m2rnn_jax.parallel.context.shard import BATCH, REPLICATED, SEQUENCE, run_over_context

if TYPE_CHECKING:
    from m2rnn_jax.layers.conv import CausalDepthwiseConv1d


def causal_conv_over_context(
    conv: CausalDepthwiseConv1d,
    x: jax.Array,
    state: jax.Array | None,
    *,
    segment_ids: jax.Array | None = None,
    axis_name: str = CONTEXT_AXIS,
) -> tuple[jax.Array, jax.Array]:
    """``conv(x, state, segment_ids=segment_ids)`` with x (B, S, C) and segment_ids (B, S) split along S:
    -> (y (B, S, C), state after the sequence (B, kernel_size - 1, C))."""
    from m2rnn_jax.parallel.context.conv import context_causal_conv  # imports the layer module (a cycle at import)

    graphdef, params = nnx.split(conv)

    def local(params: nnx.State, x: jax.Array, state: jax.Array | None, segment_ids: jax.Array | None):
        return context_causal_conv(nnx.merge(graphdef, params), x, state, segment_ids=segment_ids, axis_name=axis_name)

    return run_over_context(
        local,
        (params, x, state, segment_ids),
        (REPLICATED, SEQUENCE, BATCH, SEQUENCE),
        (SEQUENCE, BATCH),
        axis_name=axis_name,
    )


def gated_delta_rule_over_context(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    axis_name: str = CONTEXT_AXIS,
    **op_kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """:func:`m2rnn_jax.ops.gated_delta_rule` (same arguments and results) with S split over ``axis_name``."""
    return _linear_recurrence_over_context(
        context_gated_delta_rule, (q, k, v, beta, log_alpha), h0, reset, axis_name, op_kwargs
    )


def ssd_over_context(
    x: jax.Array,
    dt: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    axis_name: str = CONTEXT_AXIS,
    **op_kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """:func:`m2rnn_jax.ops.ssd` (same arguments and results) with S split over ``axis_name``."""
    return _linear_recurrence_over_context(context_ssd, (x, dt, log_decay, B, C), h0, reset, axis_name, op_kwargs)


def _linear_recurrence_over_context(
    recurrence: Any,
    sequences: tuple[jax.Array, ...],
    h0: jax.Array | None,
    reset: jax.Array | None,
    axis_name: str,
    op_kwargs: dict[str, Any],
) -> tuple[jax.Array, jax.Array]:
    """Runs ``recurrence(*sequences, h0, reset=, axis_name=, **op_kwargs)`` (a function of local shards from
    :mod:`m2rnn_jax.parallel.context.linear_recurrence`) with the sequence inputs (B, S, ...) and ``reset`` split over
    ``axis_name`` and ``h0`` per batch row; returns (output split over S, final state per batch row)."""

    def local(*args):
        *local_sequences, local_h0, local_reset = args
        return recurrence(*local_sequences, local_h0, reset=local_reset, axis_name=axis_name, **op_kwargs)

    return run_over_context(
        local,
        (*sequences, h0, reset),
        (SEQUENCE,) * len(sequences) + (BATCH, SEQUENCE),
        (SEQUENCE, BATCH),
        axis_name=axis_name,
    )


def causal_attention_over_context(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    method: str = "ring",
    axis_name: str = CONTEXT_AXIS,
) -> jax.Array:
    """Causal attention (document-masked with ``segment_ids`` (B, S)) of q (B, S, Nq, d) to k, v (B, S, Nkv, d),
    already rotated at their global positions, with S split over ``axis_name`` -> (B, S, Nq, d) in q's dtype."""
    from m2rnn_jax.parallel.context.attention import context_causal_attention  # imports layer modules

    def local(q, k, v, segment_ids):
        return (
            context_causal_attention(q, k, v, scale=scale, segment_ids=segment_ids, method=method, axis_name=axis_name),
        )

    return run_over_context(local, (q, k, v, segment_ids), (SEQUENCE,) * 4, (SEQUENCE,), axis_name=axis_name)[0]
