"""Runs of identical decoder blocks as one ``jax.lax.scan`` (``ModelConfig.scan_layers``): fewer ops to compile.

An unrolled decoder traces and compiles every block; the paper's hybrids are mostly long runs of one mixer (e.g.
``MGGGAGGGGGGGAGGGGGGGAGGG``: runs of 3 and 7 Gated DeltaNet blocks between attention blocks). Blocks with the same
letter have the same structure, so a run of them is one block applied with a stacked copy of their parameters: the
scan body is traced and compiled once per run instead of once per block. The parameter tree is left as it is (one
``DecoderBlock`` per layer, so checkpoints, interop and sharding rules do not change); the per-layer parameters
are stacked inside the traced function, which costs one copy of the run's parameters (and one of their gradients)
per step. Under a mesh XLA's partitioner shards the stacks (a sharding constraint that splits each stack like
one layer changed nothing in the TPU compile measured, RESULTS.md session 9).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# (block, x (B, S, h), mixer state or None, segment_ids or None) -> (x, new state, aux loss (scalar))
BlockRunner = Callable[[nnx.Module, jax.Array, Any, jax.Array | None], tuple[jax.Array, Any, jax.Array]]


def layer_runs(pattern: str) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal letters in ``pattern``, in order: "MGGGA" -> [(0, 1), (1, 4), (4, 5)]."""
    runs, start = [], 0
    for _, letters in itertools.groupby(pattern):
        stop = start + len(list(letters))
        runs.append((start, stop))
        start = stop
    return runs


def _stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure -> one pytree with a new leading axis (len(trees), ...) on every leaf."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, count: int) -> list[Any]:
    """Inverse of :func:`_stack`: a pytree with leading axis ``count`` -> ``count`` pytrees."""
    return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


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
    stacked_params = _stack([nnx.state(block) for block in blocks])
    stacked_states = None if all(state is None for state in states) else _stack(list(states))

    def body(carry: jax.Array, layer: tuple[Any, Any]) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        params, state = layer
        carry, new_state, aux_loss = run_block(nnx.merge(graphdef, params), carry, state, segment_ids)
        return carry, (new_state, aux_loss)

    x, (new_states, aux_losses) = jax.lax.scan(body, x, (stacked_params, stacked_states))
    return x, _unstack(new_states, len(blocks)), jnp.sum(aux_losses)
