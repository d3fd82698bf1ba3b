"""Global batch arrays built from the rows each process generates itself (no host-to-host traffic)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding


def process_rows(sharding: NamedSharding, batch_size: int, seq_len: int) -> slice:
    """The contiguous rows of a (batch_size, seq_len) batch that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((batch_size, seq_len))
    starts, stops = [], []
    for index in index_map.values():
        start, stop, _ = index[0].indices(batch_size)
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = sum(stop - start for start, stop in {(a, b) for a, b in zip(starts, stops)})
    if covered != hi - lo:
        raise ValueError(f"sharding: this process's batch rows are not contiguous ({sorted(zip(starts, stops))})")
    return slice(lo, hi)


def global_batch(
    make_rows: Callable[[slice], dict[str, np.ndarray]], sharding: NamedSharding, batch_size: int, seq_len: int
) -> dict[str, jax.Array]:
    """``make_rows(rows)`` on this process's rows, assembled into global (batch_size, seq_len) arrays."""
    rows = process_rows(sharding, batch_size, seq_len)
    local = make_rows(rows)
    return {
        name: jax.make_array_from_process_local_data(sharding, value, (batch_size,) + value.shape[1:])
        for name, value in local.items()
    }
