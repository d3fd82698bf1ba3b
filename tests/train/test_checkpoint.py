"""Checkpoints: a save interrupted by a crash never replaces the last good one; SIGTERM saves and exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

from m2rnn_jax.train.config import CheckpointConfig
from m2rnn_jax.train.restore import restore_params
from tests.train.tiny import tiny_train_config

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def test_a_crash_during_save_keeps_the_last_complete_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    result = subprocess.run(
        [sys.executable, "-m", "tests.train.crash_during_save", str(directory)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and "save of step 4 started" in result.stdout, result.stdout + result.stderr
    restored = restore_params(tiny_train_config(), directory)
    # Either the step-4 save finished before the crash, or it is invisible: never a half-written step 4.
    assert restored.step in (2, 4)
    leaves = [np.asarray(x) for x in jax.tree.leaves(restored.params)]
    assert all(np.isfinite(leaf).all() for leaf in leaves)
    if restored.step == 2:
        assert not (directory / "4").exists()


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes(tmp_path):
    config = tiny_train_config(steps=100_000, checkpoint=CheckpointConfig(every_steps=100_000))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "m2rnn_jax", "train", "--config", str(config_path), "--workdir", str(workdir)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in process.stdout:  # wait until it trains
        seen.append(line)
        if line.startswith("train step 3:"):
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(seen) + process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    saved = [line for line in output.splitlines() if "saved checkpoint at step" in line]
    assert saved, output
    step = int(saved[0].split("saved checkpoint at step ")[1].split(",")[0])
    assert step >= 3 and (workdir / "checkpoints" / str(step)).is_dir()

    again = subprocess.run(
        command + ["--set", f"steps={step + 1}"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from step {step}" in again.stdout
    assert f"train step {step + 1}:" in again.stdout
