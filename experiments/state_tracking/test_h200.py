"""The H200 script parses and refuses a call it does not know (its jobs run in `h200.sh {1|2} --smoke`, minutes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).with_name("h200.sh")


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_needs_a_call_number(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "3"], env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage: OUT=DIR bash" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing started
