"""Ahead-of-time compiles of the TPU kernels with the real Mosaic TPU compiler (libtpu) for virtual v5e and v6e chips.

Each test runs ``python -m m2rnn_jax.bench.tpu_aot`` in a subprocess whose PYTHONPATH starts with .venv-tpu
(libtpu installed there by .ci/install_tpu.sh), so this pytest process never loads the TPU plugin. The subprocess
compiles, for a 2x2 topology: the op's forward and backward (backend "pallas_tpu") under ``jax.shard_map`` over
(batch, heads), the varlen forward+backward, and one AdamW step of the ``M2RNN`` layer, data-parallel under
``jax.shard_map``. It proves that Mosaic accepts the kernels for those chips, not their numerics or speed.

Without .venv-tpu these tests skip with the install command, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tpu_aot

REPO = Path(__file__).resolve().parents[2]
# K = 64, V = 16 and Nq = Nk = 1 as in the paper (the kernel blocks are those of the 400M/7B layers); 24 heads per
# device give 3 head blocks; shorter sequences and a narrow hidden size keep the XLA part of the compile short.
PAPER_BLOCKS = ["--batch", "4", "--seq-len", "256", "--num-heads", "48", "--hidden", "256"]
# Mixed broadcasting (blocks that straddle two q/k source heads), K and V that need padding, ragged length, f32.
ODD_BLOCKS = ["--batch", "4", "--seq-len", "100", "--num-heads", "12", "--num-qk-heads", "4", "--k-dim", "9"]
ODD_BLOCKS += ["--v-dim", "9", "--dtype", "float32"]
ODD_BLOCKS += ["--target", "forward", "--target", "backward", "--target", "varlen"]


def _aot_check(env: dict[str, str], topology: str, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "m2rnn_jax.bench.tpu_aot", "--topology", topology, *extra]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    assert result.returncode == 0, "\n".join(report) + "\n" + result.stdout[-4000:] + result.stderr[-4000:]
    return report


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_kernels_and_layer_train_step_compile_for_tpu(libtpu_env, topology):
    report = _aot_check(libtpu_env, topology, PAPER_BLOCKS)
    compiled = {line.split()[2] for line in report if line.startswith("ok ")}
    assert compiled == {"forward", "backward", "varlen", "train_step"}, report


def test_padded_and_broadcast_blocks_compile_for_v5e(libtpu_env):
    report = _aot_check(libtpu_env, "v5e:2x2", ODD_BLOCKS)
    assert len([line for line in report if line.startswith("ok ")]) == 3, report
