"""Sharding on 8 fake CPU devices (one subprocess, so this process keeps its single device).

Checks (see ``eight_device_checks.py``): the op's shard_map wrapper equals the plain backend (values and
gradients, every head-broadcast case) and needs no communication; a train step sharded as dp, fsdp, tp and
fsdp x tp equals the single-device step; a checkpoint saved on one mesh restores onto other mesh shapes.
"""

from __future__ import annotations

from tests.parallel.fake_devices import run_on_fake_devices

EXPECTED = [
    "OK op_shard_map_matches_unsharded",
    "OK op_no_collectives",
    "OK public_op_kernels_in_shard_map",
    "OK public_op_varlen_in_shard_map",
    "OK sharded_step_dp",
    "OK sharded_step_fsdp",
    "OK sharded_step_tp",
    "OK sharded_step_fsdp_tp",
    "OK scanned_layers_tp",
    "OK scanned_layers_fsdp_tp",
    "OK restore_onto_data2_tensor4",
    "OK restore_onto_fsdp4_tensor2",
    "OK restore_onto_data1",
    "OK heads_must_divide_tensor",
]


def test_eight_fake_devices():
    lines = run_on_fake_devices("tests.parallel.eight_device_checks")
    for expected in EXPECTED:
        assert expected in lines, lines
