"""The run-directory rules of ``m2rnn_jax.train.restore`` without training: which config differences are another
run, which may change on resume, the message, and moving a run aside."""

from __future__ import annotations

import dataclasses
import json

import pytest

from m2rnn_jax.train.config import MeshConfig
from m2rnn_jax.train.restore import ConfigChange, check_workdir_config, config_changes, move_run_aside
from tests.train.tiny import tiny_train_config


def test_config_changes_are_dotted_and_whole_subconfigs_on_one_side():
    stored = {"steps": 4, "model": {"vocab_size": 6, "m2rnn": {"backend": "auto"}, "attention": None}}
    requested = {
        "steps": 8,
        "model": {"vocab_size": 6, "m2rnn": {"backend": "scan"}, "attention": {"heads": 2}},
        "new": 1,
    }
    assert config_changes(stored, requested) == [
        ConfigChange("steps", 4, 8),
        ConfigChange("model.m2rnn.backend", "auto", "scan"),
        ConfigChange("model.attention", None, {"heads": 2}),
        ConfigChange("new", None, 1),
    ]
    assert config_changes(stored, stored) == []


@pytest.mark.parametrize(
    "key, changeable",
    [
        ("steps", True),
        ("eval_every", True),
        ("checkpoint.every_steps", True),
        ("sample.prompts", True),
        ("mesh.data", True),
        ("data.eval_lengths", True),
        ("model.remat", True),
        ("model.m2rnn.backend", True),
        ("model.gated_deltanet.backend", True),
        ("model.attention.implementation", True),
        ("model.vocab_size", False),
        ("model.m2rnn.num_heads", False),
        ("optimizer.learning_rate", False),
        ("data.seq_len", False),
        ("data.seed", False),
        ("batch_size", False),
        ("seed", False),
        ("data.curriculum", False),
        ("model.attention", False),
    ],
)
def test_which_fields_may_change_on_resume(key, changeable):
    assert ConfigChange(key, 1, 2).changeable is changeable


def _workdir(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return tmp_path


def test_check_workdir_config(tmp_path):
    config = tiny_train_config()
    assert check_workdir_config(tmp_path / "absent", config) == []
    workdir = _workdir(tmp_path, config)
    assert check_workdir_config(workdir, config) == []
    longer = dataclasses.replace(config, steps=10, mesh=MeshConfig(data=1))
    assert check_workdir_config(workdir, longer) == [ConfigChange("mesh.data", -1, 1), ConfigChange("steps", 4, 10)]
    other = dataclasses.replace(longer, batch_size=4, seed=3)
    with pytest.raises(ValueError) as error:
        check_workdir_config(workdir, other)
    first, ways = str(error.value).split("\n")
    assert first == (
        f"--workdir {workdir}: holds a different run; differing fields: batch_size (stored 8, "
        f"requested 4), seed (stored 0, requested 3)"
    )  # the changeable steps / mesh are not listed
    assert "another --workdir" in ways and "--restart" in ways and "steps, eval_every, log_every" in ways


def test_an_unreadable_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="--workdir .*: expected a readable config.json, got .*--restart"):
        check_workdir_config(tmp_path, tiny_train_config())


def test_move_run_aside_renames_to_unique_siblings(tmp_path):
    assert move_run_aside(tmp_path / "absent") is None
    moved = []
    for number in range(2):  # twice within the same second: distinct names
        run = tmp_path / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.json").write_text(str(number))
        moved.append(move_run_aside(run))
        assert not run.exists()
    assert moved[0] != moved[1] and all(path.parent == tmp_path for path in moved)
    assert all(path.name.startswith("run.replaced-") for path in moved)
    assert [(path / "config.json").read_text() for path in moved] == ["0", "1"]
