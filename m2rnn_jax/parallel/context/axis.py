"""Whether code runs under a context axis: the ``context`` axis of the mesh set by ``jax.set_mesh``.

A layer asks :func:`context_axis_size` at trace time; above 1 it runs its sequence mixing through the functions of
:mod:`m2rnn_jax.parallel.context` (which open a ``jax.shard_map`` over that axis), otherwise it runs as on one
device. Inside a ``shard_map`` that already made the axis manual the size reads 1: the caller handles it.
"""

from __future__ import annotations

from m2rnn_jax.parallel.axes import auto_axis_sizes

CONTEXT_AXIS: str = "context"


def context_axis_size(axis_name: str = CONTEXT_AXIS) -> int:
    """Number of shards the sequence is split into by the current mesh (1: no context parallelism)."""
    return auto_axis_sizes().get(axis_name, 1)


def require_supported(feature: str, value: object, axis_name: str = CONTEXT_AXIS) -> None:
    """ValueError naming ``feature`` and the context axis when ``value`` is not None under a context axis > 1."""
    size = context_axis_size(axis_name)
    if value is not None and size > 1:
        raise ValueError(
            f"{feature}: expected None under context parallelism (mesh axis {axis_name!r} of size {size}), got "
            f"{type(value).__name__}; it cannot run with the sequence split over devices (use mesh.{axis_name}=1)"
        )
