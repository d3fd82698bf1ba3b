"""experiments/bench/trace_time.py: the trace and lower times of a preset's train step, printed as one JSON line."""

import json

import pytest

from experiments.bench.trace_time import main


def test_prints_trace_and_lower_seconds_of_a_tiny_preset(capsys):
    main(["--model", "tiny-hybrid", "--batch", "2", "--seq-len", "16", "--scan-layers"])
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "tiny-hybrid" and row["batch"] == 2 and row["seq_len"] == 16
    assert row["trace_s"] > 0 and row["lower_s"] > 0


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="model: expected one of the presets"):
        main(["--model", "no-such-preset"])
