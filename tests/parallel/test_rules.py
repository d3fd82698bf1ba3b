"""Logical-axis rules and mesh shapes (no devices needed)."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from m2rnn_jax.parallel.mesh import resolve_mesh_shape
from m2rnn_jax.parallel.rules import logical_to_mesh_axes

MESH = {"data": 2, "fsdp": 2, "tensor": 4, "expert": 1}


@pytest.mark.parametrize(
    "names, shape, expected",
    [
        (("embed", "mlp"), (64, 256), P("fsdp", "tensor")),
        (("heads", None, None), (8, 16, 16), P("tensor", None, None)),
        (("heads", None, None), (2, 16, 16), P(None, None, None)),  # 2 heads on 4 tensor shards: replicated
        (("vocab", "embed"), (6, 64), P(None, "fsdp")),  # a 6-token vocabulary does not split 4 ways
        (("batch", "seq"), (8, 128), P(("data", "fsdp"), None)),
        (("expert", "embed", "mlp"), (4, 64, 32), P(None, "fsdp", "tensor")),  # expert axis of size 1 dropped
        (("mlp", "mlp"), (8, 8), P("tensor", None)),  # a mesh axis is used once per array
        ((None,), (5,), P(None)),
    ],
)
def test_logical_to_mesh_axes(names, shape, expected):
    assert logical_to_mesh_axes(names, shape, MESH) == expected


def test_unknown_logical_name_is_an_error():
    with pytest.raises(ValueError, match="logical axis name: expected one of"):
        logical_to_mesh_axes(("width",), (4,), MESH)


def test_mesh_shape_fills_the_wildcard_and_rejects_mismatches():
    assert resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
        "data": 4,
        "fsdp": 1,
        "context": 1,
        "tensor": 2,
        "expert": 1,
    }
    with pytest.raises(ValueError, match="does not match the 8 available devices"):
        resolve_mesh_shape({"data": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="do not divide the 8 available devices"):
        resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        resolve_mesh_shape({"model": 2}, 8)
