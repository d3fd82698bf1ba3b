"""`m2rnn-jax bench --model P --compile-only`: the train step compiled for abstract inputs (memory per device, FLOPs,
compile seconds and their stages in the JSON and the text), and its bad combinations."""

from __future__ import annotations

import json

import pytest

from m2rnn_jax.cli import main
from m2rnn_jax.models.presets import get_preset
from m2rnn_jax.train.flops import training_flops_per_token

PRESET, BATCH, SEQ_LEN = "tiny-m2rnn", 2, 16


def test_compile_only_reports_memory_and_flops(tmp_path, capsys):
    path = tmp_path / "compile.json"
    args = ["bench", "--model", PRESET, "--batch", str(BATCH), "--seq-len", str(SEQ_LEN), "--compile-only"]
    assert main([*args, "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["kind"] == "compile" and "error" not in row
    assert row["compile_s"] > 0 and row["flops"] > 0
    assert row["flops_per_token"] == training_flops_per_token(get_preset(PRESET), SEQ_LEN)
    for name in ("argument", "output", "alias", "temp"):
        assert row[f"{name}_gib"] >= 0, name
    assert row["alias_gib"] > 0  # the donated state is aliased to the new state
    expected = row["argument_gib"] + row["output_gib"] - row["alias_gib"] + row["temp_gib"]
    assert row["footprint_gib"] == pytest.approx(expected)
    if row["device_memory_gib"] is None:  # CPUs report no memory limit
        assert row["fits"] is None
    else:
        assert row["fits"] == (row["footprint_gib"] <= row["device_memory_gib"])
    stages = [row[name] for name in ("trace_s", "lower_s", "backend_compile_s")]
    assert all(seconds > 0 for seconds in stages) and sum(stages) <= row["compile_s"]
    out = capsys.readouterr().out
    assert "memory per device: arguments" in out and "footprint" in out
    assert f"compile {row['compile_s']:.1f} s (trace {row['trace_s']:.1f} s, lower {row['lower_s']:.1f} s, " in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", PRESET, "--compile-only", "--step-only"], "--compile-only: expected without --step-only"),
        (["--shapes", "tiny", "--compile-only"], "--compile-only: only with --model PRESET"),
    ],
)
def test_compile_only_bad_combinations_exit_2(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err
