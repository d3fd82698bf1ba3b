"""NamedShardings for parameters (from their logical-axis metadata), optimizer states, batches and scalars."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m2rnn_jax.parallel.axes import batch_split_axes, spec_entry
from m2rnn_jax.parallel.rules import LOGICAL_AXIS_RULES, logical_to_mesh_axes


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def parameter_shardings(params: nnx.State, mesh: Mesh) -> nnx.State:
    """A state like ``params`` (concrete or abstract) holding one NamedSharding per parameter.

    Each parameter's ``out_sharding`` metadata (logical names, or None) goes through
    :data:`~m2rnn_jax.parallel.rules.LOGICAL_AXIS_RULES`.
    """
    shape_of_mesh = mesh_shape(mesh)

    def sharding_of(variable: nnx.Variable) -> nnx.Variable:
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        spec = logical_to_mesh_axes(names, variable.shape, shape_of_mesh, LOGICAL_AXIS_RULES)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_state_shardings(
    optimizer: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: nnx.State, mesh: Mesh
) -> Any:
    """Shardings of the optimizer state: moments follow their parameter, everything else is replicated."""
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch dimension."""
    return batch_split_axes(mesh_shape(mesh))


def sequence_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the sequence dimension (context parallelism)."""
    shape = mesh_shape(mesh)
    return tuple(axis for axis in LOGICAL_AXIS_RULES["seq"] if shape.get(axis, 1) > 1)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (B, S, ...) batch: B over the batch mesh axes, S over the context axis, the rest replicated."""
    spec = []
    for axes in (batch_axes(mesh), sequence_axes(mesh))[:ndim]:
        spec.append(spec_entry(axes))
    return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (ndim - len(spec)))))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split (product of the batch mesh axes)."""
    shape = mesh_shape(mesh)
    total = 1
    for axis in batch_axes(mesh):
        total *= shape[axis]
    return total
