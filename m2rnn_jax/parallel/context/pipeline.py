"""Non-linear recurrences (M2RNN, RNN, GRU) across the context axis: the boundary state flows shard to shard.

Shard r of the ``context`` axis holds positions [r S, (r + 1) S) of every sequence and needs the state that
shard r - 1 ends with. A non-linear recurrence cannot be combined out of order, so the shards run one after the
other, but on independent **micro-batches** (groups of sequences, or groups of heads): at tick t shard r runs
micro-batch i = t - r from the state that shard r - 1 handed over (``ppermute``) at tick t - 1, so shard r works on
micro-batch i while shard r + 1 works on micro-batch i - 1. With M micro-batches and P shards the pipeline takes
M + P - 1 ticks of 1/M of a shard's work each; every shard is busy M of them, idle (P - 1) / (M + P - 1).

The backward is the same schedule reversed (JAX transposes the scan over ticks and each ``ppermute``): shard r + 1
hands the cotangent of its initial state back to shard r, where it arrives as the cotangent of shard r's final
state. A recurrence with state-gradient clipping (SPEC §0.1) clamps the cotangent of its final state exactly as
the cotangent arriving from the next step, and does not clamp the cotangent of its initial state, so the clamp
is applied once per boundary, as across any step of the single-device recurrence: the result is exact.

Everything here runs inside ``jax.shard_map`` except :func:`context_recurrence`, which opens it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.heads import expand_heads
from m2rnn_jax.parallel.axes import HEAD_MESH_AXIS, auto_axis_sizes, batch_split_axes
from m2rnn_jax.parallel.context.axis import CONTEXT_AXIS
from m2rnn_jax.parallel.context.shard import (
    BATCH,
    REPLICATED,
    SEQUENCE,
    require_divisible_sequence,
    run_over_context,
)

# run(inputs, weights, h0, reset) -> (y, h_final): the single-device recurrence on local arrays (reset may be None)
Run = Callable[[tuple[jax.Array, ...], tuple[jax.Array, ...], jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]


def _to_micro(x: jax.Array, axis: int | None, num_micro: int) -> jax.Array:
    """Strided split of ``axis`` into ``num_micro`` micro-batches, stacked first: element j * M + i -> [i, j]
    (a dimension split over devices in contiguous blocks stays split the same way in every micro-batch)."""
    if axis is None:
        return x
    x = x.reshape(x.shape[:axis] + (x.shape[axis] // num_micro, num_micro) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis + 1, 0)


def _from_micro(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`_to_micro` for an array (M, ...) whose micro-batches belong on ``axis`` of the result."""
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def pipelined_recurrence(
    run: Run,
    inputs: tuple[jax.Array, ...],
    weights: tuple[jax.Array, ...],
    h0: jax.Array,
    reset: jax.Array | None = None,
    *,
    input_axes: Sequence[int | None],
    weight_axes: Sequence[int | None],
    state_axis: int,
    output_axis: int,
    num_micro_batches: int,
    axis_name: str = CONTEXT_AXIS,
) -> tuple[jax.Array, jax.Array]:
    """The pipelined schedule (module doc) of ``run`` over the shards of ``axis_name``; call inside shard_map.

    ``run(inputs, weights, h0, reset) -> (y, h_final)`` is the single-device recurrence over one local
    (micro-)shard. inputs: local shards (B, S_local, ...); weights: whole arrays; h0: the initial state of the
    global sequence (used by shard 0); reset: None or the local shard (B, S_local) of the global document starts.
    Each argument is cut into ``num_micro_batches`` along its axis in ``input_axes`` / ``weight_axes`` /
    ``state_axis`` (None: every micro-batch uses it whole; reset is cut along the batch when ``state_axis`` is 0);
    y is reassembled along ``output_axis`` and h_final along ``state_axis``.
    Returns (y of this shard, h_final after this shard): on the last shard h_final is the global final state.
    """
    num_shards = jax.lax.axis_size(axis_name)
    rank = jax.lax.axis_index(axis_name)
    m = num_micro_batches
    micro_inputs = tuple(_to_micro(x, a, m) for x, a in zip(inputs, input_axes, strict=True))
    micro_weights = tuple(_to_micro(w, a, m) for w, a in zip(weights, weight_axes, strict=True))
    micro_h0 = _to_micro(h0, state_axis, m)
    reset_axis = 0 if state_axis == 0 else None
    micro_reset = None if reset is None else _to_micro(reset, reset_axis, m)

    def pick(x: jax.Array, axis: int | None, index: jax.Array) -> jax.Array:
        return x if axis is None else jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False)

    def tick(received: jax.Array, t: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        index = jnp.clip(t - rank, 0, m - 1)  # outside [0, M) this shard idles (its results are dropped)
        start = jnp.where(rank == 0, pick(micro_h0, 0, jnp.clip(t, 0, m - 1)), received)
        y, final = run(
            tuple(pick(x, a, index) for x, a in zip(micro_inputs, input_axes)),
            tuple(pick(w, a, index) for w, a in zip(micro_weights, weight_axes)),
            start,
            None if reset is None else pick(micro_reset, reset_axis, index),
        )
        final = final.astype(received.dtype)
        handed_over = jax.lax.ppermute(final, axis_name, [(r, r + 1) for r in range(num_shards - 1)])
        return handed_over, (y, final)

    ticks = jnp.arange(m + num_shards - 1)
    _, (ys, finals) = jax.lax.scan(tick, jnp.zeros_like(micro_h0[0]), ticks)
    # micro-batch i ran on this shard at tick i + rank
    ys = jax.lax.dynamic_slice_in_dim(ys, rank, m, axis=0)
    finals = jax.lax.dynamic_slice_in_dim(finals, rank, m, axis=0)
    return _from_micro(ys, output_axis), _from_micro(finals, state_axis)


def idle_fraction(num_shards: int, num_micro_batches: int) -> float:
    """Fraction of the pipeline's ticks a shard spends idle: (P - 1) / (M + P - 1)."""
    return (num_shards - 1) / (num_micro_batches + num_shards - 1)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def choose_micro_batches(batch: int, heads: int, num_shards: int, requested: int | None = None) -> tuple[str, int]:
    """("batch" or "heads", M): how the local work of a shard is cut into micro-batches.

    batch / heads: the local (per-device) sequences and heads. ``requested``: M, which must divide one of them;
    by default the largest divisor of either that is <= 2 P (idle fraction (P - 1) / (3 P - 1), about 1/3),
    sequences preferred on a tie.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"num_micro_batches: expected a positive int, got {requested!r}")
        if batch % requested == 0:
            return "batch", requested
        if heads % requested == 0:
            return "heads", requested
        raise ValueError(
            f"num_micro_batches: expected a divisor of the local batch ({batch}) or of the local heads ({heads}), "
            f"got {requested}"
        )
    by_batch, by_heads = _largest_divisor(batch, 2 * num_shards), _largest_divisor(heads, 2 * num_shards)
    return ("batch", by_batch) if by_batch >= by_heads else ("heads", by_heads)


def context_recurrence(
    run: Run,
    inputs: tuple[jax.Array, ...],
    weights: tuple[jax.Array, ...],
    h0: jax.Array,
    *,
    reset: jax.Array | None = None,
    num_heads: int,
    num_micro_batches: int | None = None,
    axis_name: str = CONTEXT_AXIS,
) -> tuple[jax.Array, jax.Array]:
    """A per-head recurrence over sequences split along the ``axis_name`` mesh axis (the mesh of ``jax.set_mesh``).

    ``run(inputs, weights, h0, reset) -> (y, h_final)`` is the single-device recurrence (an op or a scan, reset
    (B, S) bool document starts or None, as ``reset`` here: computed on the global sequence); it is called
    on local shards inside ``jax.shard_map`` (:func:`~m2rnn_jax.parallel.context.shard.run_over_context`) by the
    pipeline of :func:`pipelined_recurrence`. Layouts: inputs (B, S, N_x, ...) heads on axis 2, weights
    (N_x, ...) heads on axis 0, h0 (B, N, ...), y (B, S, N, ...), h_final (B, N, ...); each N_x is 1 (shared by
    every head) or divides N = ``num_heads``. S must be a multiple of the context size.
    Returns (y (B, S, N, ...), h_final (B, N, ...)) equal to ``run`` on the whole sequence.
    """
    sizes = auto_axis_sizes()
    num_shards = require_divisible_sequence(inputs[0].shape[1], axis_name)
    batch_axes = batch_split_axes(sizes, h0.shape[0])
    tensor = sizes.get(HEAD_MESH_AXIS, 1)
    local_heads = num_heads // tensor if num_heads % tensor == 0 else num_heads
    local_batch = h0.shape[0] // math.prod(sizes[a] for a in batch_axes)
    unit, m = choose_micro_batches(local_batch, local_heads, num_shards, num_micro_batches)
    if unit == "heads":  # every input is either per head or shared by all heads
        inputs = tuple(x if x.shape[2] == 1 else expand_heads(x, num_heads, axis=2) for x in inputs)
        weights = tuple(w if w.shape[0] == 1 else expand_heads(w, num_heads, axis=0) for w in weights)
        input_axes = [None if x.shape[2] == 1 else 2 for x in inputs]
        weight_axes = [None if w.shape[0] == 1 else 0 for w in weights]
        state_axis, output_axis = 1, 2
    else:
        input_axes, weight_axes, state_axis, output_axis = [0] * len(inputs), [None] * len(weights), 0, 0

    def local(inputs, weights, h0, reset):
        y, final = pipelined_recurrence(
            run,
            inputs,
            weights,
            h0,
            reset,
            input_axes=input_axes,
            weight_axes=weight_axes,
            state_axis=state_axis,
            output_axis=output_axis,
            num_micro_batches=m,
            axis_name=axis_name,
        )
        return y, final[:, None]  # (B, shards, ...) over the shards: the last one is the global final state

    y, finals = run_over_context(
        local,
        (inputs, weights, h0, reset),
        (SEQUENCE, REPLICATED, BATCH, SEQUENCE),
        (SEQUENCE, SEQUENCE),
        axis_name=axis_name,
    )
    return y, finals[:, -1]
