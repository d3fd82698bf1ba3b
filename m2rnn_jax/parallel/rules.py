"""Logical axis names -> mesh axes: the one place where the sharding layout of every model is decided.

Parameters carry logical axis names as ``out_sharding`` metadata (``("embed", "mlp")``, ``("heads", None, None)``
...); activations use the same vocabulary. :data:`LOGICAL_AXIS_RULES` maps each name to the mesh axes it is split
over. A dimension is only split if its size is divisible by the product of those mesh axes (otherwise it is
replicated: e.g. a shared q/k head or a 6-token vocabulary on 4 tensor shards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

from m2rnn_jax.parallel.axes import BATCH_MESH_AXES, HEAD_MESH_AXIS

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor", "expert")

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_MESH_AXES,  # data parallel + fsdp (+ expert ranks see different tokens)
    "seq": ("context",),  # context parallelism: contiguous sequence shards (m2rnn_jax.parallel.context)
    "embed": ("fsdp",),  # ZeRO-3: parameters split along the model width
    "heads": (HEAD_MESH_AXIS,),  # tensor parallel over heads (no communication inside the recurrence)
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
}


def logical_to_mesh_axes(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array of ``shape`` whose dimensions have logical ``names``.

    Mesh axes of size 1 are dropped, a mesh axis is used at most once per array, and a dimension whose size is not
    divisible by the product of its mesh axes stays replicated.
    """
    if len(names) != len(shape):
        raise ValueError(f"names: expected {len(shape)} logical axis names for shape {tuple(shape)}, got {names}")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis name: expected one of {sorted(rules)}, got {name!r}")
        axes = tuple(a for a in rules[name] if mesh_shape.get(a, 1) > 1 and a not in used)
        total = 1
        for axis in axes:
            total *= mesh_shape[axis]
        if not axes or size % total != 0:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)
