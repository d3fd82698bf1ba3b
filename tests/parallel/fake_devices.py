"""Running a check module on 8 fake CPU devices in a subprocess (so the test process keeps its single device)."""

from __future__ import annotations

import os
import subprocess
import sys

FAKE_DEVICES = 8


def run_on_fake_devices(module: str, *args: str, timeout: int = 900) -> list[str]:
    """``python -m module args`` with JAX on ``FAKE_DEVICES`` CPU devices; its stdout lines (fails the test when
    it exits non-zero, with the ends of its output)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={FAKE_DEVICES}",
    }
    result = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result.stdout.splitlines()
