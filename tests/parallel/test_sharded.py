"""Sharding on 8 fake CPU devices (one subprocess, so this process keeps its single device).

Checks (see ``eight_device_checks.py``): the op's shard_map wrapper equals the plain backend (values and
gradients, every head-broadcast case) and needs no communication; a train step sharded as dp, fsdp, tp and
fsdp x tp equals the single-device step; a checkpoint saved on one mesh restores onto other mesh shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

EXPECTED = [
    "OK op_shard_map_matches_unsharded",
    "OK op_no_collectives",
    "OK public_op_kernels_in_shard_map",
    "OK public_op_varlen_in_shard_map",
    "OK sharded_step_dp",
    "OK sharded_step_fsdp",
    "OK sharded_step_tp",
    "OK sharded_step_fsdp_tp",
    "OK restore_onto_data2_tensor4",
    "OK restore_onto_fsdp4_tensor2",
    "OK restore_onto_data1",
    "OK heads_must_divide_tensor",
]


def test_eight_fake_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.parallel.eight_device_checks"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for expected in EXPECTED:
        assert expected in lines, result.stdout
