"""``m2rnn-jax convert``: lm-engine -> run directory -> lm-engine is exact; bad inputs exit 2 naming the problem."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.cli import main
from m2rnn_jax.interop.lm_engine_config import to_lm_engine_config
from m2rnn_jax.interop.names import lm_engine_tensors
from m2rnn_jax.interop.safetensors_io import SafetensorsReader, write_safetensors
from m2rnn_jax.models import Decoder
from m2rnn_jax.models.presets import tiny_config

CASES = {"every-mixer-moe": ("MGSARU", True, False), "m2rnn-attention-tied": ("MMAM", False, True)}


def _lm_engine_checkpoint(directory, pattern="MGSARU", moe=True, tied=False, edit=None):
    """A random lm-engine checkpoint directory (NumPy weights, no JAX compilation); returns its tensors."""
    config = tiny_config(pattern, moe=moe).replace(tie_embeddings=tied)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype), abstract)
    tensors = dict(lm_engine_tensors(params))
    lm_config = to_lm_engine_config(config)
    if edit is not None:
        edit(tensors, lm_config)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", {k: (v.shape, v.dtype) for k, v in tensors.items()},
                      tensors.__getitem__)
    (directory / "config.json").write_text(json.dumps(lm_config))
    return tensors, lm_config


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(tmp_path, case, capsys):
    pattern, moe, tied = CASES[case]
    tensors, lm_config = _lm_engine_checkpoint(tmp_path / "src", pattern, moe, tied)
    assert main(["convert", "--from-lm-engine", str(tmp_path / "src"), "--workdir", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["layer_pattern"] == pattern and saved["model"]["tie_embeddings"] == tied
    assert main(["convert", "--to-lm-engine", "--checkpoint", str(tmp_path / "run"),
                 "--output", str(tmp_path / "back")]) == 0
    assert "peak RSS" in capsys.readouterr().out
    back = SafetensorsReader(tmp_path / "back")
    assert back.names() == set(tensors)
    for name, value in tensors.items():
        restored = back.read(name)
        assert restored.dtype == value.dtype and restored.tobytes() == value.tobytes(), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == lm_config


def _drop_tensor(tensors, _):
    del tensors["transformer.h.1.sequence_mixer.o_norm.weight"]


def _misshape_tensor(tensors, _):
    tensors["transformer.h.0.sequence_mixer.conv1d.weight"] = np.zeros((64, 4), np.float32)


def _bad_config(_, config):
    config["sequence_mixer_blocks"][3]["attention_gate"] = True


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_tensor, r"missing tensors \['transformer.h.1.sequence_mixer.o_norm.weight'\]"),
        (_misshape_tensor, r"transformer.h.0.sequence_mixer.conv1d.weight: expected shape \(64, 1, 4\), got \(64, 4\)"),
        (_bad_config, r"sequence_mixer_blocks\[3\].attention_gate: expected one of \[False\]"),
    ],
)
def test_bad_checkpoints_exit_2_naming_the_problem(tmp_path, edit, message, capsys):
    _lm_engine_checkpoint(tmp_path / "src", edit=edit)
    assert main(["convert", "--from-lm-engine", str(tmp_path / "src"), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_argument_errors(tmp_path, capsys):
    assert main(["convert", "--to-lm-engine", "--checkpoint", str(tmp_path)]) == 2
    assert "--output: required with --to-lm-engine" in capsys.readouterr().err
    assert main(["convert", "--to-lm-engine", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "expected a run directory holding config.json" in capsys.readouterr().err
    assert main(["convert", "--from-lm-engine", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert "holding config.json" in capsys.readouterr().err


def test_existing_checkpoints_are_not_overwritten(tmp_path, capsys):
    _lm_engine_checkpoint(tmp_path / "src", "MR", moe=False)
    args = ["convert", "--from-lm-engine", str(tmp_path / "src"), "--workdir", str(tmp_path / "run")]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.slow
def test_converted_run_evaluates_generates_and_trains(tmp_path):
    _lm_engine_checkpoint(tmp_path / "src", "MA", moe=True)
    assert main(["convert", "--from-lm-engine", str(tmp_path / "src"), "--workdir", str(tmp_path / "run"),
                 "--set", "steps=12", "--set", "batch_size=2", "--set", "data.seq_len=16"]) == 0
    assert main(["eval", "--workdir", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert main(["generate", "--checkpoint", str(run), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    assert main(["train", "--config", str(run / "config.json"), "--workdir", str(run)]) == 0  # resumes at step 0
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12
