"""Two processes on loopback (CPU, gloo collectives) train like one process with the same two devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from m2rnn_jax.train.config import CheckpointConfig, MeshConfig
from m2rnn_jax.train.restore import restore_params
from tests.train.tiny import tiny_train_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _train(config_path, workdir, *, env_extra: dict[str, str], extra_args: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
    command = [
        sys.executable,
        "-m",
        "m2rnn_jax",
        "train",
        "--config",
        str(config_path),
        "--workdir",
        str(workdir),
        *extra_args,
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one_process(tmp_path):
    config = tiny_train_config(steps=3, mesh=MeshConfig(data=2), checkpoint=CheckpointConfig(every_steps=3))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    port = _free_port()
    workers = [
        _train(
            config_path,
            tmp_path / "two_processes",
            env_extra={"XLA_FLAGS": ""},
            extra_args=[
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(index),
            ],
        )
        for index in range(2)
    ]
    single = _train(
        config_path, tmp_path / "one_process", env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    )
    outputs = []
    for process in (*workers, single):
        output, _ = process.communicate(timeout=600)
        outputs.append(output)
        assert process.returncode == 0, output
    assert "train step 3" in outputs[0] and "train step 3" not in outputs[1]  # only process 0 logs
    assert "train step 3" in outputs[2]

    one_device = tiny_train_config(steps=3, mesh=MeshConfig(data=1))
    multi = restore_params(one_device, tmp_path / "two_processes" / "checkpoints")
    reference = restore_params(one_device, tmp_path / "one_process" / "checkpoints")
    assert multi.step == reference.step == 3
    for a, b in zip(jax.tree.leaves(multi.params), jax.tree.leaves(reference.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
