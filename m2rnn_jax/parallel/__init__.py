"""Sharding: meshes over (data, fsdp, context, tensor, expert), logical-axis rules, shardings, global batches,
multi-host; context parallelism (sequences split over the ``context`` axis) in :mod:`m2rnn_jax.parallel.context`.

The shard_map wrapper that runs the M2RNN kernels per (batch, heads) block lives with the op, in
:mod:`m2rnn_jax.ops.m2rnn.sharding`.
"""

from m2rnn_jax.parallel.mesh import build_mesh, resolve_mesh_shape
from m2rnn_jax.parallel.rules import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_mesh_axes
from m2rnn_jax.parallel.shardings import (
    batch_sharding,
    batch_shards,
    optimizer_state_shardings,
    parameter_shardings,
    replicated,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "batch_sharding",
    "batch_shards",
    "build_mesh",
    "logical_to_mesh_axes",
    "optimizer_state_shardings",
    "parameter_shardings",
    "replicated",
    "resolve_mesh_shape",
]
