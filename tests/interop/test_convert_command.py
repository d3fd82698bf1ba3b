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
    write_safetensors(
        directory / "model.safetensors", {k: (v.shape, v.dtype) for k, v in tensors.items()}, tensors.__getitem__
    )
    (directory / "config.json").write_text(json.dumps(lm_config))
    return tensors, lm_config


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(tmp_path, case, capsys):
    pattern, moe, tied = CASES[case]
    tensors, lm_config = _lm_engine_checkpoint(tmp_path / "src", pattern, moe, tied)
    assert main(["convert", "--from-lm-engine", str(tmp_path / "src"), "--workdir", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["layer_pattern"] == pattern and saved["model"]["tie_embeddings"] == tied
    assert (
        main(["convert", "--to-lm-engine", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "back")])
        == 0
    )
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
    assert (
        main(
            [
                "convert",
                "--from-lm-engine",
                str(tmp_path / "src"),
                "--workdir",
                str(tmp_path / "run"),
                "--set",
                "steps=12",
                "--set",
                "batch_size=2",
                "--set",
                "data.seq_len=16",
            ]
        )
        == 0
    )
    assert main(["eval", "--workdir", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert main(["generate", "--checkpoint", str(run), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    assert main(["train", "--config", str(run / "config.json"), "--workdir", str(run)]) == 0  # resumes at step 0
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12


# ------------------------------------------------------------------ parameters-only checkpoints (issue 16's memory)


def _converted_run(tmp_path, pattern="MR"):
    """An lm-engine checkpoint converted into ``tmp_path/run``; returns (its tensors, its TrainConfig, optimizer,
    abstract state with shardings on one device)."""
    from m2rnn_jax.parallel.mesh import build_mesh
    from m2rnn_jax.train.checkpoint import abstract_with_shardings
    from m2rnn_jax.train.config import TrainConfig
    from m2rnn_jax.train.optimizer import build_optimizer
    from m2rnn_jax.train.state import abstract_train_state, train_state_shardings

    tensors, _ = _lm_engine_checkpoint(tmp_path / "src", pattern, moe=False)
    assert (
        main(
            [
                "convert",
                "--from-lm-engine",
                str(tmp_path / "src"),
                "--workdir",
                str(tmp_path / "run"),
                "--set",
                "batch_size=2",
                "--set",
                "data.seq_len=8",
                "--set",
                "steps=2",
                "--set",
                "optimizer.warmup_steps=1",
            ]
        )
        == 0
    )
    config = TrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    optimizer = build_optimizer(config.optimizer, config.steps)
    abstract = abstract_train_state(config.model, optimizer)
    shardings = train_state_shardings(abstract, optimizer, build_mesh(config.mesh.axis_sizes))
    return tensors, config, optimizer, abstract_with_shardings(abstract, shardings)


def _saved_opt_state(step_dir):
    """The optimizer-state part of the tree Orbax recorded for checkpoint directory ``step_dir`` (None if absent)."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as reader:
        metadata = reader.metadata(step_dir / "state")
    tree = getattr(metadata, "item_metadata", metadata).tree
    return tree["opt_state"]


def test_import_writes_parameters_only_and_restore_builds_the_optimizer_state(tmp_path):
    from m2rnn_jax.train.checkpoint import Checkpointer

    tensors, _, optimizer, abstract = _converted_run(tmp_path)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    try:
        with pytest.raises(ValueError, match=r"checkpoint: step 0 .* holds parameters only; pass the optimizer"):
            checkpointer.restore(abstract)
        state, metadata = checkpointer.restore(abstract, optimizer=optimizer)
        only, _ = checkpointer.restore(abstract, params_only=True)
    finally:
        checkpointer.close()
    assert metadata["params_only"] is True and int(state.step) == 0 and only.opt_state is None
    assert _saved_opt_state(tmp_path / "run" / "checkpoints" / "0") is None
    expected = jax.jit(optimizer.init)(state.params)  # the fresh moments: what training from these params starts at
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(expected)
    for got, want, target in zip(
        jax.tree.leaves(state.opt_state), jax.tree.leaves(expected), jax.tree.leaves(abstract.opt_state)
    ):
        assert got.sharding.is_equivalent_to(target.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    exported = dict(lm_engine_tensors(state.params))
    assert all(exported[name].tobytes() == value.tobytes() for name, value in tensors.items())


def test_export_of_a_full_checkpoint_reads_only_the_parameters(tmp_path):
    """A trained run's checkpoint holds optimizer moments; export restores the parameters without them and writes
    the same tensors. Here the moments are made non-zero so that mixing them up with parameters would show."""
    from m2rnn_jax.train.checkpoint import Checkpointer

    tensors, _, optimizer, abstract = _converted_run(tmp_path)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    try:
        state, _ = checkpointer.restore(abstract, optimizer=optimizer)
        moments = jax.tree.map(
            lambda x: x + 7 if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state.opt_state
        )
        checkpointer.save(state._replace(step=state.step + 1, opt_state=moments), {"step": 1})
        checkpointer.wait_until_finished()
        full, metadata = checkpointer.restore(abstract, 1)
        only, _ = checkpointer.restore(abstract, 1, params_only=True)
    finally:
        checkpointer.close()
    assert "params_only" not in metadata and only.opt_state is None
    assert _saved_opt_state(tmp_path / "run" / "checkpoints" / "1") is not None
    assert all(float(np.min(np.asarray(leaf))) == 7 for leaf in jax.tree.leaves(full.opt_state) if leaf.ndim)
    for name, value in lm_engine_tensors(only.params):
        assert value.tobytes() == tensors[name].tobytes(), name
    assert (
        main(
            [
                "convert",
                "--to-lm-engine",
                "--checkpoint",
                str(tmp_path / "run"),
                "--step",
                "1",
                "--output",
                str(tmp_path / "back"),
            ]
        )
        == 0
    )
    back = SafetensorsReader(tmp_path / "back")
    assert all(back.read(name).tobytes() == value.tobytes() for name, value in tensors.items())


def test_trainer_resumes_from_a_converted_run(tmp_path):
    """The trainer's resume path on a parameters-only checkpoint: step 0, the converted parameters, fresh moments;
    one step later it saves a full checkpoint."""
    from m2rnn_jax.train.trainer import Trainer

    tensors, config, _, _ = _converted_run(tmp_path)
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.step == 0
    assert all(value.tobytes() == tensors[name].tobytes() for name, value in lm_engine_tensors(trainer.state.params))
    fresh = jax.jit(trainer.optimizer.init)(trainer.state.params)
    for got, want in zip(jax.tree.leaves(trainer.state.opt_state), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    trainer.run()
    assert _saved_opt_state(tmp_path / "run" / "checkpoints" / "2") is not None
