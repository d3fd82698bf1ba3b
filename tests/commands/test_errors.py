"""One error style for every command, through real processes (``python -m m2rnn_jax ...``): exit status 2,
``m2rnn-jax <command>: error: <flag or key>: ...`` on stderr, no traceback.

All the processes start at once in one module fixture (each is mostly the JAX import), then each test checks one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from m2rnn_jax.cli import main
from tests.train.tiny import tiny_train_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ON_CPU = jax.default_backend() == "cpu"

# name -> (argv after `python -m m2rnn_jax`, expected start of the error line after the command's prefix).
# {run} is a directory holding only the config.json of a tiny S3 run (vocabulary 6) and no checkpoint; {tmp} a
# scratch directory. SUBPROCESS cases run as real processes (exit status, stderr, no traceback); the others run
# through m2rnn_jax.cli.main in this process (the same code path, without paying a JAX import each).
SUBPROCESS: dict[str, tuple[list[str], str]] = {
    "info_unknown_preset": (["info", "--preset", "x"], "--preset: expected a preset name (m2rnn-jax info --list"),
    "eval_missing_workdir": (["eval", "--workdir", "missing/"], "--workdir: expected an existing run directory"),
    "generate_prompt_outside_vocab": (
        ["generate", "--checkpoint", "{run}", "--prompt-ids", "1,7"],
        "--prompt-ids: expected ids in [0, 6), got [1, 7]",
    ),
    "train_bad_flag": (["train", "--workdir", "{tmp}/t", "--bogus"], "unrecognized arguments: --bogus"),
}
IN_PROCESS: dict[str, tuple[list[str], str]] = {
    "generate_missing_checkpoint": (
        ["generate", "--checkpoint", "missing/", "--prompt-ids", "1"],
        "--checkpoint: expected an existing run directory",
    ),
    "train_unknown_key": (
        ["train", "--preset", "state-tracking-s3-tiny", "--workdir", "{tmp}/t", "--set", "optimizer.lr=1"],
        "optimizer: unknown key 'lr'",
    ),
    "train_nothing_to_train": (["train", "--workdir", "{tmp}/empty"], "--preset or --config: expected one of them"),
    "bench_model_unknown_preset": (["bench", "--model", "x"], "--model: expected a preset name"),
    "generate_run_without_checkpoint": (
        ["generate", "--checkpoint", "{run}", "--prompt-ids", "1"],
        "--checkpoint: expected a run directory with a checkpoint, got none under",
    ),
    "eval_another_model": (
        ["eval", "--workdir", "{run}", "--preset", "state-tracking-parity-tiny"],
        "--workdir {run}: holds a different model; differing fields: model.vocab_size (stored 6, "
        "requested 2), model.hidden_size (stored 16, requested 64)",
    ),
    "generate_another_model": (
        ["generate", "--checkpoint", "{run}", "--preset", "state-tracking-parity-tiny", "--prompt-ids", "1"],
        "--checkpoint {run}: holds a different model; differing fields: model.vocab_size (stored 6, requested 2)",
    ),
}
if ON_CPU:  # backends that need hardware this machine lacks
    SUBPROCESS["compare_pallas_gpu"] = (
        ["compare", "--backend", "pallas_gpu"],
        "--backend: expected a backend this machine can run (pallas_gpu needs an NVIDIA GPU",
    )
    IN_PROCESS.update(
        {
            "bench_pallas_gpu": (
                ["bench", "--backends", "pallas_gpu", "--shapes", "tiny"],
                "--backends: expected a backend this machine can run (pallas_gpu needs an NVIDIA GPU",
            ),
            "train_pallas_tpu": (
                ["train", "--preset", "tiny-m2rnn", "--workdir", "{tmp}/t", "--set", "model.m2rnn.backend=pallas_tpu"],
                "model.m2rnn.backend: expected a backend this machine can run (pallas_tpu needs a TPU",
            ),
        }
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """(tmp, run): a scratch directory and a run directory holding only config.json (no checkpoint)."""
    tmp = tmp_path_factory.mktemp("errors")
    run = tmp / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(tiny_train_config().to_dict()))
    return tmp, run


def _argv(argv: list[str], scratch) -> list[str]:
    tmp, run = scratch
    return [arg.format(run=run, tmp=tmp) for arg in argv]


def _check(name: str, cases: dict, returncode: int, stderr: str, scratch) -> None:
    argv, expected = cases[name]
    expected = _argv([expected], scratch)[0]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    prefix = f"m2rnn-jax {argv[0]}: error: "
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr
    assert lines[0][len(prefix) :].startswith(expected), stderr


@pytest.fixture(scope="module")
def finished(scratch) -> dict[str, subprocess.CompletedProcess]:
    """Every SUBPROCESS case, started at once (each is mostly the JAX import)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "m2rnn_jax", *_argv(argv, scratch)],
            cwd=scratch[0],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (argv, _) in SUBPROCESS.items()
    }
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


@pytest.mark.parametrize("name", list(SUBPROCESS))
def test_user_mistakes_in_a_process_exit_2_with_one_error_line(finished, scratch, name):
    _check(name, SUBPROCESS, finished[name].returncode, finished[name].stderr, scratch)


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_user_mistakes_through_main(scratch, capsys, name):
    returncode = main(_argv(IN_PROCESS[name][0], scratch))
    _check(name, IN_PROCESS, returncode, capsys.readouterr().err, scratch)


def test_unknown_preset_lists_the_presets(finished):
    assert "tiny-m2rnn, text-demo" in finished["info_unknown_preset"].stderr
    assert "got 'x'" in finished["info_unknown_preset"].stderr


def test_prompt_ids_are_checked_before_loading_the_model(finished):
    """The run has no checkpoint: a model built or restored first would fail differently (or print 'loaded')."""
    assert "loaded step" not in finished["generate_prompt_outside_vocab"].stderr
    assert "expected a run directory with a checkpoint" not in finished["generate_prompt_outside_vocab"].stderr


def test_missing_directory_is_named(finished):
    assert "got 'missing/' (no such directory)" in finished["eval_missing_workdir"].stderr
