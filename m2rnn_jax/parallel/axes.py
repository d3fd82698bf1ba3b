"""Mesh-axis names and the batch split, shared by the sharding rules and the ops' ``shard_map`` wrappers.

It imports nothing of the package, so that ops can use it while the rest of :mod:`m2rnn_jax.parallel` stays free
to import ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax

# The mesh axes that split the batch: data parallel + fsdp (+ expert ranks see different tokens).
BATCH_MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")
# The mesh axis that splits heads (tensor parallelism; no communication inside a recurrence).
HEAD_MESH_AXIS: str = "tensor"


def auto_axis_sizes() -> dict[str, int]:
    """Sizes of the current (``jax.set_mesh``) mesh's axes that are not manual yet (not inside a caller's
    ``shard_map``); empty without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}
    manual = set(mesh.manual_axes)
    return {name: size for name, size in zip(mesh.axis_names, mesh.axis_sizes) if name not in manual}


def batch_split_axes(sizes: Mapping[str, int], batch: int | None = None) -> tuple[str, ...]:
    """The batch mesh axes of size > 1 in ``sizes``; none when ``batch`` rows are given and their product does
    not divide it."""
    axes = tuple(axis for axis in BATCH_MESH_AXES if sizes.get(axis, 1) > 1)
    if batch is not None and batch % math.prod(sizes[axis] for axis in axes) != 0:
        return ()
    return axes


def spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """One PartitionSpec entry for a dimension split over ``axes``: None, the axis name, or the tuple."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes
