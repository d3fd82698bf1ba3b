"""experiments/bench/trace_time.py: the trace and lower times of a preset's train step, printed as one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench.trace_time import main


def test_prints_trace_and_lower_seconds_of_a_tiny_preset(capsys):
    main(["--model", "tiny-hybrid", "--batch", "2", "--seq-len", "16", "--scan-layers"])
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "tiny-hybrid" and row["batch"] == 2 and row["seq_len"] == 16
    assert row["construct_s"] > 0 and row["trace_s"] > 0 and row["lower_s"] > 0
    assert row["without_origin_messages"] is False


def test_without_origin_messages_runs_in_its_own_process():
    """The flag replaces a JAX method for the rest of the process: run it apart from the other tests."""
    command = [sys.executable, "-m", "experiments.bench.trace_time", "--model", "tiny-hybrid", "--batch", "2"]
    command += ["--seq-len", "16", "--without-origin-messages"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[2], check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["without_origin_messages"] is True and row["construct_s"] > 0 and row["trace_s"] > 0


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="model: expected one of the presets"):
        main(["--model", "no-such-preset"])
