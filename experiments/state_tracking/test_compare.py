"""The state-tracking comparison end to end on a tiny budget, and its pieces (curves, recipe, model variants)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.state_tracking import compare
from experiments.state_tracking.models import MODELS, ModelSize, model_config
from experiments.state_tracking.positions import accuracy_curves, at_lengths, evaluation_batch
from experiments.state_tracking.recipes import RECIPES
from m2rnn_jax.data.state_tracking import get_group, running_products


def test_accuracy_curves_position_and_sequence():
    correct = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=bool)
    curves = accuracy_curves(correct)
    np.testing.assert_allclose(curves["position"], [1.0, 2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(curves["sequence"], [1.0, 2 / 3, 1 / 3, 1 / 3])
    assert at_lengths(curves, [2, 4]) == {
        "2": {"position": 2 / 3, "sequence": 2 / 3},
        "4": {"position": 1.0, "sequence": 1 / 3},
    }
    with pytest.raises(ValueError, match="lengths"):
        at_lengths(curves, [5])


def test_evaluation_batch_is_fixed_and_correct():
    first, second = evaluation_batch("a5", 12, 8), evaluation_batch("a5", 12, 8)
    np.testing.assert_array_equal(first["inputs"], second["inputs"])
    np.testing.assert_array_equal(first["targets"], running_products(get_group("a5"), first["inputs"]))


def test_every_variant_builds_and_the_gdn_pair_differs_only_in_eigenvalues():
    configs = {name: model_config(name, "s5", ModelSize(hidden_size=32, num_layers=1)) for name in MODELS}
    assert all(config.vocab_size == 120 for config in configs.values())
    assert {config.layer_pattern for config in configs.values()} == set("MURGSA")
    assert not configs["gdn"].gated_deltanet.allow_neg_eigval and configs["gdn-neg"].gated_deltanet.allow_neg_eigval
    assert configs["attention"].attention.position_embedding == "rope"
    with pytest.raises(ValueError, match="model: expected one of"):
        model_config("lstm", "s3", ModelSize())


def test_recipe_curriculum_scales_with_steps():
    recipe = RECIPES["gpu"]
    assert recipe.curriculum_steps() == ((0, 16), (900, 64), (1800, 128))
    assert max(recipe.lengths) == 512 and {16, 64, 128, 256, 384}.issubset(recipe.lengths)
    shorter = recipe.with_train_length(32)
    assert shorter.train_length == 32 and shorter.curriculum == ((0.0, 4), (0.3, 16), (0.6, 32))


def test_compare_end_to_end(tmp_path, capsys):
    # Training at length 1 keeps it to one compiled train step per model.
    argv = [
        "--recipe",
        "cpu",
        "--models",
        "m2rnn",
        "attention",
        "--seeds",
        "0",
        "--steps",
        "4",
        "--train-length",
        "1",
        "--batch-size",
        "4",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--lengths",
        "2",
        "6",
        "--eval-sequences",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert compare.main(argv) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    summary = report["summary"]["s3"]
    assert list(summary) == ["m2rnn", "attention"]
    for entry in summary.values():
        assert entry["steps_done"] == 4 and entry["seeds"] == [0]
        assert set(entry["at_lengths"]) == {"2", "6"}
    for run in report["runs"]:
        assert len(run["curves"]["position"]) == 6
        assert run["curves"]["position"][0] >= run["curves"]["sequence"][5]
        assert all(0.0 <= value <= 1.0 for value in run["curves"]["sequence"])
        assert not (tmp_path / "runs" / "s3" / run["model"] / "s0" / "checkpoints").exists()
    table = (tmp_path / "compare.md").read_text()
    assert "| M2RNN |" in table and "| Attention (RoPE) |" in table and "@6" in table
    assert (tmp_path / "compare_s3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second call finds the finished runs and trains nothing; --report-only rebuilds the report.
    result_path = tmp_path / "runs" / "s3" / "m2rnn" / "s0" / "result.json"
    stamp = result_path.stat().st_mtime_ns
    assert compare.main(argv) == 0
    assert result_path.stat().st_mtime_ns == stamp
    (tmp_path / "compare.md").unlink()
    assert compare.main(argv + ["--report-only"]) == 0
    assert "| M2RNN |" in (tmp_path / "compare.md").read_text()
    assert "[compare] wrote" in capsys.readouterr().out


def test_compare_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        compare.main(["--models", "lstm", "--out", str(tmp_path)])


@pytest.mark.slow
def test_compare_time_budget_records_partial_runs_and_goes_on(tmp_path):
    argv = [
        "--recipe",
        "cpu",
        "--models",
        "m2rnn",
        "--seeds",
        "0",
        "1",
        "--steps",
        "100000",
        "--train-length",
        "6",
        "--batch-size",
        "4",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--lengths",
        "3",
        "--eval-sequences",
        "8",
        "--run-seconds",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert compare.main(argv) == 0
    for seed in (0, 1):
        directory = tmp_path / "runs" / "s3" / "m2rnn" / f"s{seed}"
        result = json.loads((directory / "result.json").read_text())
        assert 1 <= result["steps_done"] < 100000 and not result["complete"]
        assert (directory / "checkpoints").is_dir()  # kept: the next call resumes from it
    assert "of 100000" in (tmp_path / "compare.md").read_text()
