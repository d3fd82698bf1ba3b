"""Global batch arrays built from the rows each process generates itself (no host-to-host traffic)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding


def _process_range(sharding: NamedSharding, shape: tuple[int, int], dim: int) -> slice:
    """The contiguous range of dimension ``dim`` of a ``shape`` array that this process's devices hold."""
    blocks = {index[dim].indices(shape[dim])[:2] for index in sharding.addressable_devices_indices_map(shape).values()}
    lo, hi = min(start for start, _ in blocks), max(stop for _, stop in blocks)
    if sum(stop - start for start, stop in blocks) != hi - lo:
        name = ("rows", "sequence positions")[dim]
        raise ValueError(f"sharding: this process's batch {name} are not contiguous ({sorted(blocks)})")
    return slice(lo, hi)


def process_rows(sharding: NamedSharding, batch_size: int, seq_len: int) -> slice:
    """The contiguous rows of a (batch_size, seq_len) batch that this process's devices hold."""
    return _process_range(sharding, (batch_size, seq_len), 0)


def process_positions(sharding: NamedSharding, batch_size: int, seq_len: int) -> slice:
    """The contiguous sequence positions of a (batch_size, seq_len) batch that this process's devices hold
    (all of them unless the context axis spans processes)."""
    return _process_range(sharding, (batch_size, seq_len), 1)


def global_batch(
    make_rows: Callable[[slice], dict[str, np.ndarray]], sharding: NamedSharding, batch_size: int, seq_len: int
) -> dict[str, jax.Array]:
    """``make_rows(rows)`` on this process's rows (whole sequences), cut to this process's sequence positions and
    assembled into global (batch_size, seq_len) arrays."""
    rows = process_rows(sharding, batch_size, seq_len)
    positions = process_positions(sharding, batch_size, seq_len)
    local = make_rows(rows)
    return {
        name: jax.make_array_from_process_local_data(sharding, value[:, positions], (batch_size,) + value.shape[1:])
        for name, value in local.items()
    }
