"""Expert-parallel MoE on 8 fake CPU devices (one subprocess, so this process keeps its single device).

Checks (see ``moe_expert_checks.py``): the all-to-all dispatch equals the single-device layer (outputs, aux loss,
every parameter and input gradient; float32 and float64) for expert = 2, 4, 8 beside data / fsdp / tensor /
context axes, skewed routing and top_k 1 to 4; "local" dispatch and the "auto" fallback run the in-place program;
an expert axis that does not divide the experts and an unsplittable batch under "all_to_all" raise ValueError.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.parallel.moe_expert_checks import CASES

EXPECTED = [
    *(f"OK matches_unsharded_{case[0]}" for case in CASES),
    "OK local_dispatch",
    "OK auto_falls_back_to_local",
    "OK errors",
]


def test_expert_parallel_moe_on_eight_fake_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.parallel.moe_expert_checks"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for expected in EXPECTED:
        assert expected in lines, result.stdout
