"""The context axis in the configuration, the rules and the pipeline's micro-batch choice (no devices needed)."""

from __future__ import annotations

import dataclasses

import pytest
from jax.sharding import PartitionSpec as P

from m2rnn_jax.parallel.context import choose_micro_batches, context_axis_size, idle_fraction
from m2rnn_jax.parallel.mesh import resolve_mesh_shape
from m2rnn_jax.parallel.rules import MESH_AXES, logical_to_mesh_axes
from m2rnn_jax.train.config import MeshConfig
from tests.train.tiny import tiny_train_config


def test_context_is_a_mesh_axis_and_seq_maps_to_it():
    assert "context" in MESH_AXES and MeshConfig(context=4).axis_sizes["context"] == 4
    assert resolve_mesh_shape({"context": 4, "data": -1}, 8)["data"] == 2
    mesh = {"data": 2, "fsdp": 1, "context": 4, "tensor": 1, "expert": 1}
    assert logical_to_mesh_axes(("batch", "seq", None), (8, 64, 16), mesh) == P("data", "context", None)
    assert logical_to_mesh_axes(("batch", "seq"), (8, 6), mesh) == P("data", None)  # 6 positions: not split


def test_every_sequence_length_must_split_over_the_context_axis():
    config = tiny_train_config()  # seq_len 8, eval_lengths (8,)
    assert dataclasses.replace(config, mesh=MeshConfig(context=4)).mesh.context == 4
    with pytest.raises(ValueError, match=r"mesh.context: expected a divisor of every sequence length .* got 3"):
        dataclasses.replace(config, mesh=MeshConfig(context=3))
    data = dataclasses.replace(config.data, eval_lengths=(8, 12))
    with pytest.raises(ValueError, match=r"\[8, 12\].* got 8"):
        dataclasses.replace(config, data=data, mesh=MeshConfig(context=8))


@pytest.mark.parametrize(
    "batch, heads, shards, requested, expected",
    [
        (1, 84, 8, None, ("heads", 14)),  # one long sequence: micro-batches of heads, the largest divisor <= 2 P
        (16, 4, 4, None, ("batch", 8)),
        (4, 4, 2, None, ("batch", 4)),  # a tie goes to the batch
        (3, 5, 4, None, ("heads", 5)),
        (2, 6, 2, 3, ("heads", 3)),
        (2, 6, 2, 1, ("batch", 1)),  # serial: one micro-batch
    ],
)
def test_micro_batch_choice(batch, heads, shards, requested, expected):
    assert choose_micro_batches(batch, heads, shards, requested) == expected


def test_micro_batch_errors_and_idle_fraction():
    with pytest.raises(
        ValueError,
        match=r"num_micro_batches: expected a divisor of the local batch \(2\) or of the "
        r"local heads \(6\), got 4",
    ):
        choose_micro_batches(2, 6, 2, 4)
    with pytest.raises(ValueError, match="num_micro_batches: expected a positive int, got 0"):
        choose_micro_batches(2, 6, 2, 0)
    assert idle_fraction(8, 14) == pytest.approx(7 / 21)
    assert idle_fraction(8, 1) == pytest.approx(7 / 8)  # the serial pipeline
    assert context_axis_size() == 1  # no mesh set
