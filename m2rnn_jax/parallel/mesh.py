"""Device meshes over the axes ``(data, fsdp, context, tensor, expert)`` from a
:class:`~m2rnn_jax.train.config.MeshConfig`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from m2rnn_jax.parallel.rules import MESH_AXES


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills the one ``-1`` axis with the remaining devices; ValueError if the shape does not match the devices."""
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; expected a subset of {MESH_AXES}")
    sizes = {axis: int(axis_sizes.get(axis, 1)) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    wildcard = [axis for axis, size in sizes.items() if size == -1]
    if len(wildcard) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    if wildcard:
        if num_devices % fixed != 0:
            raise ValueError(
                f"mesh: the fixed axes {sizes} (product {fixed}) do not divide the {num_devices} available devices"
            )
        sizes[wildcard[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*context*tensor*expert = {total} ({sizes}) does not match the {num_devices} available "
            f"devices; set one axis to -1 to use all of them"
        )
    return sizes


def build_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with Auto axis types (GSPMD propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(axis_sizes, len(devices))
    return jax.make_mesh(
        tuple(sizes[axis] for axis in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def without_context(mesh: Mesh) -> Mesh:
    """``mesh`` with its ``context`` axis folded into ``data`` (the same devices, ``context`` of size 1): for work
    that cannot split the sequence over devices, such as token-by-token decoding after a context-parallel run."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    context = sizes.get("context", 1)
    if context == 1:
        return mesh
    sizes["data"], sizes["context"] = sizes["data"] * context, 1
    return build_mesh(sizes, list(mesh.devices.flat))
