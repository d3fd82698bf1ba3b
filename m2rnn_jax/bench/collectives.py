"""Collectives in an optimized (SPMD-partitioned) HLO module: how many of each kind and how many bytes they move.

The text is the per-device program (``compiled.as_text()``), so every shape is a per-chip shape. Each collective
is counted once where it appears in the program: one inside a loop body (the gradient-accumulation scan, the
chunked LM head) runs once per iteration but is counted once. An asynchronous pair (``all-gather-start`` /
``all-gather-done``) counts as one collective whose bytes are those of the ``-done`` result. Bytes are the size of
the collective's result on one chip (for an all-gather the gathered array, for a reduce-scatter the scattered
shard, for an all-reduce the reduced array).
"""

from __future__ import annotations

import math
import re

COLLECTIVE_KINDS: tuple[str, ...] = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ELEMENT_BYTES: dict[str, float] = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# "%name = <result shape> <opcode>(" ; the result shape may be a tuple "(f32[2]{0}, f32[4]{0})".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>[a-z][\w\-]*)\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string such as ``bf16[8,128]{1,0}`` or a tuple of them (tokens count 0)."""
    total = 0.0
    for match in _ARRAY.finditer(shape):
        dtype = match.group("dtype")
        if dtype not in _ELEMENT_BYTES:
            continue
        dims = [int(d) for d in match.group("dims").split(",") if d]
        total += _ELEMENT_BYTES[dtype] * math.prod(dims)
    return int(total)


def _kind(opcode: str) -> tuple[str | None, bool]:
    """(collective kind or None, whether this instruction is the counted one of its kind)."""
    for kind in COLLECTIVE_KINDS:
        if opcode == kind or opcode == f"{kind}-done":
            return kind, True
        if opcode == f"{kind}-start":
            return kind, False
    return None, False


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": b}}`` for every kind of :data:`COLLECTIVE_KINDS` (zeros included)."""
    result = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVE_KINDS}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        kind, counted = _kind(match.group("op"))
        if kind is None or not counted:
            continue
        result[kind]["count"] += 1
        result[kind]["bytes"] += shape_bytes(match.group("shape"))
    return result
