"""Repeated decoder blocks as ``jax.lax.scan`` loops (``ModelConfig.scan_layers``): fewer ops to compile.

An unrolled decoder traces and compiles every block; the paper's hybrids are mostly long runs of one mixer (e.g.
``MGGGAGGGGGGGAGGGGGGGAGGG``: runs of 3 and 7 Gated DeltaNet blocks between attention blocks). Blocks with the same
letter have the same structure, so a run of them is one block applied with a stacked copy of their parameters: the
scan body is traced and compiled once per run instead of once per block.

XLA compiles each loop body on its own, so equal runs in different places are still compiled once each. When a
sequence of runs repeats back to back (a *period*: the 7B hybrid's ``AGGGGGGG`` four times), the period is one
scan over its repetitions whose body applies the period's runs in order (an inner scan for a run longer than one
block, the block itself for a run of one): the body is compiled once for all repetitions. :func:`layer_plan`
splits a pattern into such segments (runs and periods), :func:`run_segment` applies one. XLA also compiles
identical kernels once, and each layer of a stack is read back (its gradient, for the optimizer) through a slice
whose offset is baked into the kernels that read it: so a period's run of several blocks is passed to the loop as
one (repeats, ...) stack per place in the run, stacked over the run inside the body, not as one (repeats, length,
...) stack (which made one distinct kernel per layer: twice the compile time on XLA:CPU, docs/models.md, Limits).

The parameter tree is left as it is (one ``DecoderBlock`` per layer, so checkpoints, interop and sharding rules do
not change); the per-layer parameters are stacked inside the traced function, which costs one copy of the scanned
blocks' parameters (and one of their gradients) per step. Under a mesh XLA's partitioner shards the stacks (a
sharding constraint that splits each stack like one layer changed nothing in the TPU compile measured, RESULTS.md
session 9).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# (block, x (B, S, h), mixer state or None, segment_ids or None) -> (x, new state, aux loss (scalar))
BlockRunner = Callable[[nnx.Module, jax.Array, Any, jax.Array | None], tuple[jax.Array, Any, jax.Array]]


class Segment(NamedTuple):
    """Layers ``start`` to ``stop`` of a pattern: ``repeats`` times the consecutive runs of equal letters whose
    lengths are ``runs``. A single run has ``repeats == 1`` and one length; a period has ``repeats >= 2``.

    Example: in ``"MAGGAGG"``, ``Segment(start=1, runs=(1, 2), repeats=2)`` is layers 1-6, ``AGG`` twice.
    """

    start: int
    runs: tuple[int, ...]
    repeats: int = 1

    @property
    def stop(self) -> int:
        """One past the last layer of the segment."""
        return self.start + self.repeats * sum(self.runs)


def layer_runs(pattern: str) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal letters in ``pattern``, in order: "MGGGA" -> [(0, 1), (1, 4), (4, 5)]."""
    runs, start = [], 0
    for _, letters in itertools.groupby(pattern):
        stop = start + len(list(letters))
        runs.append((start, stop))
        start = stop
    return runs


def layer_plan(pattern: str) -> list[Segment]:
    """Split ``pattern`` into segments, greedily from the left: at each run, the segment starting there that covers
    the most layers (a period repeated as often as it recurs back to back, or else the run alone; of periods that
    cover equally many layers, the one of fewest runs).

    "MGGGAGGGGGGGAGGGGGGGAGGG" (the 400M hybrid) -> M, GGG, (AGGGGGGG) x 2, A, GGG:
    ``[Segment(0, (1,)), Segment(1, (3,)), Segment(4, (1, 7), 2), Segment(20, (1,)), Segment(21, (3,))]``.
    """
    runs = layer_runs(pattern)
    keys = [(pattern[start], stop - start) for start, stop in runs]  # runs repeat when letters and lengths do
    plan, index = [], 0
    while index < len(runs):
        best_period, best_repeats, best_layers = 1, 1, keys[index][1]
        for period in range(2, (len(runs) - index) // 2 + 1):
            body = keys[index : index + period]
            repeats = 1
            while keys[index + repeats * period : index + (repeats + 1) * period] == body:
                repeats += 1
            layers = repeats * sum(length for _, length in body)
            if repeats >= 2 and layers > best_layers:
                best_period, best_repeats, best_layers = period, repeats, layers
        lengths = tuple(length for _, length in keys[index : index + best_period])
        plan.append(Segment(runs[index][0], lengths, best_repeats))
        index += best_period * best_repeats
    return plan


def _stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure -> one pytree with a new leading axis (len(trees), ...) on every leaf (None when
    every tree is None: no mixer states)."""
    if all(tree is None for tree in trees):
        return None
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, count: int) -> list[Any]:
    """Inverse of :func:`_stack`: a pytree with leading axis ``count`` -> ``count`` pytrees."""
    return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


def _scan_stacked(
    graphdef: nnx.GraphDef,
    params: Any,
    states: Any,
    x: jax.Array,
    segment_ids: jax.Array | None,
    run_block: BlockRunner,
) -> tuple[jax.Array, Any, jax.Array]:
    """One ``lax.scan`` of the block ``graphdef`` over stacked (n, ...) ``params`` and ``states`` (or None) ->
    (x, new states stacked (n, ...), the sum of the n aux losses)."""

    def body(carry: jax.Array, layer: tuple[Any, Any]) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        layer_params, state = layer
        carry, new_state, aux_loss = run_block(nnx.merge(graphdef, layer_params), carry, state, segment_ids)
        return carry, (new_state, aux_loss)

    x, (new_states, aux_losses) = jax.lax.scan(body, x, (params, states))
    return x, new_states, jnp.sum(aux_losses)


def run_blocks_scanned(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    states: Sequence[Any],
    segment_ids: jax.Array | None,
    run_block: BlockRunner,
) -> tuple[jax.Array, list[Any], jax.Array]:
    """Apply ``blocks`` (same structure, e.g. one letter) in order with one ``jax.lax.scan`` over their parameters.

    Args:
        blocks: the run's blocks; their parameters and states are stacked along a new leading axis.
        x: (B, S, h) input of the first block.
        states: one mixer state per block (all None, or all of one structure).
        segment_ids: (B, S) document ids or None, the same for every block.
        run_block: applies one block (the plain call or its ``nnx.remat`` form).

    Returns:
        (x (B, S, h) after the last block, the new mixer state of each block, the sum of the blocks' aux losses).
        Equal to applying the blocks one by one (up to the order of floating-point operations XLA picks).
    """
    graphdef, *_ = nnx.split(blocks[0])
    params = _stack([nnx.state(block) for block in blocks])
    x, new_states, aux_loss = _scan_stacked(graphdef, params, _stack(list(states)), x, segment_ids, run_block)
    return x, _unstack(new_states, len(blocks)), aux_loss


def run_period_scanned(
    blocks: Sequence[nnx.Module],
    runs: tuple[int, ...],
    repeats: int,
    x: jax.Array,
    states: Sequence[Any],
    segment_ids: jax.Array | None,
    run_block: BlockRunner,
) -> tuple[jax.Array, list[Any], jax.Array]:
    """Apply ``blocks``, ``repeats`` times the runs of lengths ``runs``, with one ``jax.lax.scan`` over the
    repetitions; its body applies the runs in order (an inner scan for a run longer than one block).

    Args:
        blocks: ``repeats * sum(runs)`` blocks in layer order; the blocks at the same place of every repetition have
            the same structure. Run i's parameters are stacked to (repeats, ...) for a run of one block, else to
            (repeats, runs[i], ...); the same for the states.
        runs: the lengths of the period's runs, in order.
        repeats: how many times the period repeats.
        x: (B, S, h) input of the first block.
        states: one mixer state per block (all None, or per place in the period one structure).
        segment_ids: (B, S) document ids or None, the same for every block.
        run_block: applies one block (the plain call or its ``nnx.remat`` form).

    Returns:
        (x (B, S, h) after the last block, the new mixer state of each block, the sum of the blocks' aux losses),
        as :func:`run_blocks_scanned`.
    """
    period = sum(runs)
    if len(blocks) != repeats * period:
        raise ValueError(f"blocks: expected repeats * sum(runs) = {repeats * period} blocks, got {len(blocks)}")
    starts = [sum(runs[:i]) for i in range(len(runs))]
    # layers[i][r]: the indices into ``blocks`` of run i in repetition r
    layers = [
        [list(range(r * period + start, r * period + start + length)) for r in range(repeats)]
        for start, length in zip(starts, runs)
    ]

    def group(trees: Sequence[Any]) -> list[Any]:
        """Per-block trees -> per run, stacked over repetitions: one (repeats, ...) tree for a run of one block, a
        list of one (repeats, ...) tree per place in the run for a run of several (stacked over the run's blocks
        inside the loop body: a (repeats, length, ...) stack would read each layer back through a slice of its
        own offset, one distinct kernel per layer, where (repeats, ...) stacks of equal shapes share theirs)."""
        grouped = []
        for run_layers in layers:
            places = list(zip(*run_layers))  # places[j]: block j of the run in every repetition
            stacks = [_stack([trees[k] for k in place]) for place in places]
            grouped.append(stacks[0] if len(stacks) == 1 else stacks)
        return grouped

    graphdefs = [nnx.split(blocks[run_layers[0][0]])[0] for run_layers in layers]

    def body(carry: jax.Array, repetition: tuple[list[Any], list[Any]]) -> tuple[jax.Array, tuple[list[Any], Any]]:
        run_params, run_states = repetition
        new_states, aux_losses = [], []
        for graphdef, params, state, length in zip(graphdefs, run_params, run_states, runs):
            if length == 1:
                carry, new_state, aux_loss = run_block(nnx.merge(graphdef, params), carry, state, segment_ids)
            else:
                params, state = _stack(params), _stack(state)
                carry, new_state, aux_loss = _scan_stacked(graphdef, params, state, carry, segment_ids, run_block)
            new_states.append(new_state)
            aux_losses.append(aux_loss)
        return carry, (new_states, sum(aux_losses[1:], aux_losses[0]))

    params = group([nnx.state(block) for block in blocks])
    x, (new_states, aux_losses) = jax.lax.scan(body, x, (params, group(list(states))))
    per_block: list[Any] = [None] * len(blocks)
    for run_layers, stacked in zip(layers, new_states):
        for rep, rep_states in zip(run_layers, _unstack(stacked, repeats)):
            for k, state in zip(rep, [rep_states] if len(rep) == 1 else _unstack(rep_states, len(rep))):
                per_block[k] = state
    return x, per_block, jnp.sum(aux_losses)


def run_segment(
    blocks: Sequence[nnx.Module],
    segment: Segment,
    x: jax.Array,
    states: Sequence[Any],
    segment_ids: jax.Array | None,
    run_block: BlockRunner,
) -> tuple[jax.Array, list[Any], jax.Array]:
    """Apply the ``segment``'s ``blocks`` (layers ``segment.start`` to ``segment.stop``, with their ``states``): a
    single block by itself, a run as :func:`run_blocks_scanned`, a period as :func:`run_period_scanned`.

    Returns:
        (x (B, S, h) after the last block, the new mixer state of each block, the sum of the blocks' aux losses).
    """
    if segment.repeats > 1:
        return run_period_scanned(blocks, segment.runs, segment.repeats, x, states, segment_ids, run_block)
    if len(blocks) > 1:
        return run_blocks_scanned(blocks, x, states, segment_ids, run_block)
    x, new_state, aux_loss = run_block(blocks[0], x, states[0], segment_ids)
    return x, [new_state], aux_loss
