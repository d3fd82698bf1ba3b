"""Mesh-axis names that more than the sharding rules need: the ops' ``shard_map`` splits use them too.

A leaf module (it imports nothing of the package), so that ops and layers can take the names from here while the
rest of :mod:`m2rnn_jax.parallel` stays free to import them.
"""

from __future__ import annotations

# The mesh axes that split the batch: data parallel + fsdp (+ expert ranks see different tokens).
BATCH_MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")
# The mesh axis that splits heads (tensor parallelism; no communication inside a recurrence).
HEAD_MESH_AXIS: str = "tensor"
