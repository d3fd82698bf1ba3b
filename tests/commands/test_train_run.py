"""``m2rnn-jax train`` / ``eval`` on one tiny run: the start-up header, phase lines and step/total lines on a pipe,
and a workdir that holds a different run (the error naming the fields, resuming with a changeable field,
``--restart`` keeping the old run readable).

One module fixture trains the run (S3, one M2RNN layer, 4 steps, curriculum length 4 -> 8); tests that change a
run work on a copy of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil

import jax
import pytest

from m2rnn_jax.cli import main
from m2rnn_jax.train.config import TrainConfig
from m2rnn_jax.train.restore import restore_params
from tests.train.tiny import tiny_train_config


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config file, run directory, stdout of the training)."""
    tmp = tmp_path_factory.mktemp("train_run")
    config = tiny_train_config(steps=4, log_every=2, eval_every=2)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, curriculum=((0, 4), (2, 8))))
    config_file = tmp / "tiny.json"
    config_file.write_text(json.dumps(config.to_dict()))
    code, out, err = _run(["train", "--config", str(config_file), "--workdir", str(tmp / "run")])
    assert code == 0, out + err
    return config_file, tmp / "run", out


def test_header_phases_and_step_total_lines_on_a_pipe(trained):
    config_file, run, out = trained
    lines = out.splitlines()
    assert lines[0] == f"m2rnn-jax train: {config_file}"
    header = dict(line.split(None, 1) for line in lines[1:8])
    assert list(header) == ["model", "devices", "dtypes", "data", "steps", "workdir", "compiles"]
    assert header["model"].startswith("M (1 layers, hidden 16, vocab 6), ") and header["model"].endswith(" parameters")
    assert "mesh data=1" in header["devices"]
    assert header["dtypes"] == "compute float32, parameters float32, remat none"
    assert header["data"] == "state tracking, group s3; length 4 -> 8; batch 8"
    assert header["steps"].startswith("4 (log every 2, evaluate every 2")
    assert header["workdir"] == f"{run} (new run)"
    assert header["compiles"] == f"cached in {jax.config.jax_compilation_cache_dir}"  # the conftest's test cache
    phases = [line for line in lines if line.startswith("-- ")]
    expected = [
        "-- initialising the parameters ...",
        "-- initialising the parameters: initialised in ",
        "-- compiling the train step for length 4 (batch 8) ...",
        "-- compiling the train step for length 4 (batch 8): compiled and ran the first step in ",
        "-- evaluating at length(s) 8 (step 2) ...",
        "-- evaluating at length(s) 8 (step 2): evaluated in ",
        "-- checkpoint: step 2 being written in the background to ",
        "-- curriculum: sequence length 4 -> 8 at step 2",
        "-- compiling the train step for length 8 (batch 8) ...",
        "-- compiling the train step for length 8 (batch 8): compiled and ran the first step in ",
        "-- checkpoint: step 4 being written in the background to ",
        "-- evaluating at length(s) 8 (step 4) ...",
    ]
    assert len(phases) >= len(expected)
    for phase, start in zip(phases, expected):
        assert phase.startswith(start), (phase, phases)
    train_lines = [line for line in lines if line.startswith("train step ")]
    assert [line.split(":")[0] for line in train_lines] == ["train step 2", "train step 4"]
    # Steps 1 and 3 compile (lengths 4 and 8) and are kept out of the rate: steps 2 and 4 are timed.
    assert re.search(r"seq_len=4 \[2/4 \([0-9.e+]+ step/s, eta 0s\)\]$", train_lines[0]), train_lines[0]
    assert re.search(r"seq_len=8 \[4/4 \([0-9.e+]+ step/s, eta 0s\)\]$", train_lines[1]), train_lines[1]


def test_eval_prints_a_header_and_a_phase_per_length(trained):
    _, run, _ = trained
    code, out, err = _run(["eval", "--workdir", str(run), "--lengths", "8", "4", "--output", str(run.parent)])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"m2rnn-jax eval: {run}"
    assert lines[1].split(None, 1) == ["checkpoint", lines[1].split(None, 1)[1]] and "step 4" in lines[1]
    assert "lengths     8 (1 x 8 rows), 4 (1 x 8 rows)" in out
    assert "-- evaluating length 8 (1 batches): evaluated in " in out
    assert "-- evaluating length 4 (1 batches): evaluated in " in out


def test_a_workdir_holding_another_run_is_refused_untouched(trained):
    config_file, run, _ = trained
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    code, out, err = _run(
        [
            "train",
            "--config",
            str(config_file),
            "--workdir",
            str(run),
            "--set",
            "model.vocab_size=8",
            "--set",
            "batch_size=4",
        ]
    )
    assert code == 2
    assert out == ""  # nothing built, no header
    first = err.splitlines()[0]
    assert first == (
        f"m2rnn-jax train: error: --workdir {run}: holds a different run; differing fields: "
        f"model.vocab_size (stored 6, requested 8), batch_size (stored 8, requested 4)"
    )
    assert "--restart" in err and "another --workdir" in err and "steps, eval_every" in err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_changeable_fields_resume_and_update_config_json(trained, tmp_path):
    _, run, _ = trained
    copy = shutil.copytree(run, tmp_path / "run")
    code, out, err = _run(["train", "--workdir", str(copy), "--set", "steps=5", "--set", "log_every=1"])
    assert code == 0, err
    assert "resuming from step 4; changed: steps (stored 4, requested 5), log_every (stored 2, requested 1)" in out
    assert "resumed from step 4 in " in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("train step")] == ["train step 5"]
    stored = json.loads((copy / "config.json").read_text())
    assert stored["steps"] == 5 and stored["log_every"] == 1


def test_restart_moves_the_old_run_aside_readable(trained, tmp_path):
    config_file, run, _ = trained
    copy = shutil.copytree(run, tmp_path / "run")
    code, out, err = _run(
        [
            "train",
            "--config",
            str(config_file),
            "--workdir",
            str(copy),
            "--restart",
            "--set",
            "model.vocab_size=8",
            "--set",
            "steps=1",
            "--set",
            "data.curriculum=[]",
        ]
    )
    assert code == 0, err
    (moved,) = tmp_path.glob("run.replaced-*")
    assert f"moved the previous run {copy} to {moved}" in out and f"{copy} (new run)" in out
    old = TrainConfig.from_dict(json.loads((moved / "config.json").read_text()))
    assert old.model.vocab_size == 6 and old.steps == 4
    assert restore_params(old, moved / "checkpoints").step == 4
    assert json.loads((copy / "config.json").read_text())["model"]["vocab_size"] == 8
