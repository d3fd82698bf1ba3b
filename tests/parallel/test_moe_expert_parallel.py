"""Expert-parallel MoE on 8 fake CPU devices (one subprocess, so this process keeps its single device).

Checks (see ``moe_expert_checks.py``): the all-to-all dispatch equals the single-device layer (outputs, aux loss,
every parameter and input gradient; float32 and float64) for expert = 2, 4, 8 beside data / fsdp / tensor /
context axes, skewed routing and top_k 1 to 4; "local" dispatch and the "auto" fallback run the in-place program;
an expert axis that does not divide the experts and an unsplittable batch under "all_to_all" raise ValueError.
"""

from __future__ import annotations

from tests.parallel.fake_devices import run_on_fake_devices
from tests.parallel.moe_expert_checks import CASES

EXPECTED = [
    *(f"OK matches_unsharded_{case[0]}" for case in CASES),
    "OK local_dispatch",
    "OK auto_falls_back_to_local",
    "OK errors",
]


def test_expert_parallel_moe_on_eight_fake_devices():
    lines = run_on_fake_devices("tests.parallel.moe_expert_checks")
    for expected in EXPECTED:
        assert expected in lines, lines
