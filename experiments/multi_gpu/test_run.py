"""The multi-GPU script and its helpers: the CPU twin's smallest part end to end, the summary's comparison."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from experiments.multi_gpu import compare
from experiments.multi_gpu.op_parallel import layouts, shape_by_name, tensor_size
from experiments.multi_gpu.train_run import parse_arguments, row_path

SCRIPT = Path(__file__).with_name("run.sh")


def _smoke(tmp_path: Path, parts: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OUT": str(tmp_path / "out"), "PARTS": parts, **env}
    environment.pop("XLA_FLAGS", None)  # the script sets the fake device counts itself
    return subprocess.run(
        ["bash", str(SCRIPT), "--smoke"], env=environment, capture_output=True, text=True, timeout=600
    )


def test_script_parses_and_refuses_unknown_flags(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--fast"], env={"OUT": str(tmp_path), "PATH": os.environ["PATH"]}, capture_output=True
    )
    assert done.returncode == 2 and not any(tmp_path.iterdir())


def test_op_part_on_eight_cpu_devices(tmp_path):
    """PARTS=op --smoke: the M2RNN op on one device, heads over tensor=8, time over context=8; same results."""
    done = _smoke(tmp_path, "op")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "rows", "status.txt", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["layout"]: row for row in summary["op"]["rows"]}
    assert summary["op"]["device"].startswith("8 x cpu")
    assert rows["tensor"]["mesh"] == {"tensor": 8, "data": 1} and rows["context"]["mesh"] == {"context": 8}
    for layout in ("tensor", "context"):
        assert rows[layout]["max_rel_diff"] < 1e-5  # float32
        assert rows[layout]["forward_ms"] > 0 and rows[layout]["fwd_bwd_ms"] > 0
    assert "op rc=0" in (out / "status.txt").read_text()


@pytest.mark.slow
def test_reference_and_data_parallel_runs_agree(tmp_path):
    """PARTS="ref data" --smoke, 3 steps: the tiny hybrid on 1 CPU device and data=8 end with the same loss."""
    done = _smoke(tmp_path, "ref data", STEPS="3")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {row["label"]: row for row in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]}
    assert set(runs) == {"ref", "ref_long", "data"}
    assert runs["data"]["reference"] == "ref" and runs["data"]["ok"]
    assert runs["data"]["mesh"]["data"] == 8 and runs["ref"]["devices"].startswith("1 x cpu")
    assert abs(runs["data"]["loss_diff"]) < 1e-4 * runs["ref"]["loss"]


def _row(label, seq_len, loss, **extra):
    return {"label": label, "seq_len": seq_len, "loss": loss, "grad_norm": 1.0, **extra}


def test_compare_runs_flags_a_loss_outside_the_tolerance():
    runs = {
        "ref": _row("ref", 64, 5.0),
        "ref_long": _row("ref_long", 256, 4.0),
        "data": _row("data", 64, 5.0 + 4e-5),
        "context": _row("context", 256, 4.01),
    }
    table = {row["label"]: row for row in compare.compare_runs(runs, 1e-5)}
    assert "ok" not in table["ref"] and "ok" not in table["ref_long"]
    assert table["data"]["reference"] == "ref" and table["data"]["ok"] is True
    assert table["context"]["reference"] == "ref_long" and table["context"]["ok"] is False
    assert table["context"]["loss_diff"] == pytest.approx(0.01)


def test_merge_rows_joins_the_processes_of_one_run(tmp_path):
    base = {"label": "dist", "seq_len": 64, "num_processes": 2, "mesh": {"data": 2}}
    (tmp_path / "dist.p1.json").write_text(json.dumps({**base, "process_index": 1, "peak_gib": [2.0]}))
    (tmp_path / "dist.p0.json").write_text(json.dumps({**base, "process_index": 0, "peak_gib": [1.0], "loss": 3.0}))
    merged = compare.merge_rows(tmp_path)["dist"]
    assert merged["peak_gib"] == [1.0, 2.0] and merged["loss"] == 3.0 and merged["processes_reported"] == 2


def test_markov_tokens_have_four_successors_per_id():
    tokens = compare.markov_tokens(20_000, 16, seed=1)
    assert tokens.dtype == np.uint32 and tokens.max() < 16
    successors = {(int(a), int(b)) for a, b in zip(tokens[:-1], tokens[1:])}
    assert max(sum(1 for a, _ in successors if a == token) for token in range(16)) <= compare.SUCCESSORS
    with pytest.raises(ValueError, match="vocab_size: expected >= 4, got 3"):
        compare.markov_tokens(10, 3)


def test_train_run_arguments():
    train_arguments = ["--preset", "tiny-m2rnn", "--workdir", "w", "--set", "mesh.data=2"]
    ours, train = parse_arguments(["--label", "x", "--steps", "4", "--out", "r/x.json", "--", *train_arguments])
    assert train.overrides == ["mesh.data=2", "steps=5", "log_every=4", "checkpoint.every_steps=5"]
    assert row_path(ours.out, 3) == Path("r/x.p3.json")
    with pytest.raises(ValueError, match="--steps: expected an int >= 2"):
        parse_arguments(["--label", "x", "--steps", "1", "--out", "o", "--", "--workdir", "w"])
    with pytest.raises(ValueError, match="argv: expected '--'"):
        parse_arguments(["--label", "x"])


def test_op_layouts_split_the_heads_that_divide():
    assert tensor_size(8, 84) == 4 and tensor_size(2, 84) == 2 and tensor_size(8, 8) == 8
    assert layouts(shape_by_name("400m"), 8)["tensor"] == {"tensor": 4, "data": 2}
    with pytest.raises(ValueError, match="--shape: expected 'smoke' or one of"):
        shape_by_name("huge")
