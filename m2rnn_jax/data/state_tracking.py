"""Synthetic state-tracking tasks: predict the running product of a sequence of group elements.

A sample is a sequence ``x_1 .. x_S`` of group elements drawn uniformly at random, each encoded as a token
(its index in a fixed enumeration of the group); the target at position t is the token of the running
product ``p_t = p_{t-1} * x_t`` with ``p_0`` the identity (so ``p_1 = x_1``). Groups:

* ``parity``: Z_2 (tokens 0/1, the target is the running XOR),
* ``s3``, ``s5``: all permutations of 3 / 5 items (6 / 120 elements),
* ``a5``: even permutations of 5 items (60 elements, the smallest non-solvable group: NC^1-complete).

Permutations compose as functions: ``(a * b)(i) = b(a(i))``, i.e. first apply a, then b.
Batches are a pure function of ``(seed, step)`` (numpy PCG64), so a loader can be restarted at any step and
every process can cut its rows out of the same global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

GROUPS = ("parity", "s3", "s5", "a5")


@dataclasses.dataclass(frozen=True)
class Group:
    """A finite group given by its multiplication table ``table[a, b] = a * b`` over element indices."""

    name: str
    table: np.ndarray  # (G, G) int32
    identity: int

    @property
    def order(self) -> int:
        return int(self.table.shape[0])


def _is_even(perm: tuple[int, ...]) -> bool:
    inversions = sum(1 for i, j in itertools.combinations(range(len(perm)), 2) if perm[i] > perm[j])
    return inversions % 2 == 0


def _permutation_group(name: str, n: int, even_only: bool) -> Group:
    elements = [p for p in itertools.permutations(range(n)) if not even_only or _is_even(p)]
    index = {p: i for i, p in enumerate(elements)}
    table = np.empty((len(elements), len(elements)), dtype=np.int32)
    for a, pa in enumerate(elements):
        for b, pb in enumerate(elements):
            table[a, b] = index[tuple(pb[pa[i]] for i in range(n))]
    return Group(name=name, table=table, identity=index[tuple(range(n))])


@functools.cache
def get_group(name: str) -> Group:
    """The group called ``name`` (one of ``GROUPS``)."""
    if name == "parity":
        return Group(name="parity", table=np.array([[0, 1], [1, 0]], dtype=np.int32), identity=0)
    if name == "s3":
        return _permutation_group("s3", 3, even_only=False)
    if name == "s5":
        return _permutation_group("s5", 5, even_only=False)
    if name == "a5":
        return _permutation_group("a5", 5, even_only=True)
    raise ValueError(f"group: expected one of {GROUPS}, got {name!r}")


def running_products(group: Group, tokens: np.ndarray) -> np.ndarray:
    """Targets for ``tokens`` (B, S): ``out[:, t] = tokens[:, 0] * ... * tokens[:, t]`` -> (B, S) int32."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected a (batch, seq) array, got shape {tokens.shape}")
    out = np.empty(tokens.shape, dtype=np.int32)
    product = np.full((tokens.shape[0],), group.identity, dtype=np.int32)
    for t in range(tokens.shape[1]):
        product = group.table[product, tokens[:, t]]
        out[:, t] = product
    return out


def state_tracking_batch(
    group: Group, *, seed: int, step: int, batch_size: int, seq_len: int, rows: slice | None = None
) -> dict[str, np.ndarray]:
    """The global batch number ``step`` of the stream ``seed``, or the ``rows`` slice of it.

    Returns ``{"inputs": (b, seq_len) int32, "targets": (b, seq_len) int32}`` where b is ``batch_size`` or the
    length of ``rows``. The same (seed, step) always gives the same batch, whatever the slice.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len: expected >= 1, got {batch_size} and {seq_len}")
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    tokens = rng.integers(0, group.order, size=(batch_size, seq_len), dtype=np.int32)
    if rows is not None:
        tokens = tokens[rows]
    return {"inputs": tokens, "targets": running_products(group, tokens)}
