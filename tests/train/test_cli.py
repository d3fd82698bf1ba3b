"""``m2rnn-jax train`` / ``eval`` / ``info``: clear errors for bad configs, presets listed, eval of a run."""

from __future__ import annotations

import json

import pytest

from m2rnn_jax.cli import main
from tests.train.tiny import tiny_train_config


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "optimizer.lr=1"], "unknown key 'lr'"),
        (["--set", "model.m2rnn.num_q_heads=3"], "model.m2rnn: num_q_heads: expected a divisor of num_heads"),
        (["--set", "mesh.data=2"], "does not match the 1 available devices"),
        (["--set", "mesh.tensor=3", "--set", "mesh.data=-1"], "do not divide the 1 available devices"),
        (["--set", "data.kind=token_file"], "data.path: expected a token file"),
    ],
)
def test_train_reports_bad_configs(tmp_path, capsys, extra, message):
    code = main(["train", "--preset", "state-tracking-s3-tiny", "--workdir", str(tmp_path), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_and_missing_config_file(tmp_path, capsys):
    assert main(["train", "--preset", "state-tracking-s4-tiny", "--workdir", str(tmp_path)]) == 2
    assert "unknown preset 'state-tracking-s4-tiny'; did you mean" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "--config: no such file" in capsys.readouterr().err


def test_info_lists_the_training_presets(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    for group in ("parity", "s3", "s5", "a5"):
        assert f"state-tracking-{group}-tiny" in out


def test_train_then_eval_at_new_lengths(tmp_path, capsys):
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(tiny_train_config(steps=2).to_dict()))
    workdir = tmp_path / "run"
    assert main(["train", "--config", str(config_path), "--workdir", str(workdir)]) == 0
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir), "--lengths", "8", "12"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 2" in out
    assert [line.split()[0] for line in out.splitlines() if line.strip().startswith(("8 ", "12 "))] == ["8", "12"]
    report = json.loads((workdir / "length_generalization.json").read_text())
    assert sorted(report["results"]) == ["12", "8"] and report["step"] == 2
    assert main(["eval", "--workdir", str(workdir), "--step", "7"]) == 2
    assert "--step: expected one of [2]" in capsys.readouterr().err
