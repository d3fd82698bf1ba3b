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
    assert recipe.curriculum_steps() == ((0, 32), (900, 128))
    assert max(recipe.lengths) == 512 and {16, 64, 128, 256, 384}.issubset(recipe.lengths)
    shorter = recipe.with_train_length(32)
    assert shorter.train_length == 32 and shorter.curriculum == ((0.0, 8), (0.3, 32))
    # A stage is never shorter than 2 (length 1 has nothing to compose) unless training is at length 1.
    assert recipe.with_train_length(4).curriculum == ((0.0, 2), (0.3, 4))
    assert recipe.with_train_length(1).curriculum == ((0.0, 1), (0.3, 1))


def test_run_budget_shares_the_time_left():
    assert compare.run_budget(None, 3, None) is None and compare.run_budget(None, 3, 50.0) == 50.0
    share = 300 / 3 - compare.EVALUATION_SECONDS
    assert compare.run_budget(300.0, 3, None) == pytest.approx(share)
    assert compare.run_budget(300.0, 3, 30.0) == 30.0  # --run-seconds caps the share
    # Too little time for three runs: it goes to as many as it fits (here one); none fits: 0, skip.
    shortest = compare.SHORTEST_RUN_SECONDS + compare.EVALUATION_SECONDS
    assert compare.run_budget(1.5 * shortest, 3, None) == pytest.approx(1.5 * shortest - compare.EVALUATION_SECONDS)
    assert compare.run_budget(0.9 * shortest, 3, None) == 0.0
    with pytest.raises(ValueError, match="runs_left"):
        compare.run_budget(100.0, 0, None)


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
        run_dir = tmp_path / "runs" / "s3" / run["model"] / "s0"
        assert not (run_dir / "checkpoints").exists()
        assert not (run_dir / "length_generalization.json").exists()  # no second evaluation by the trainer
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
    with pytest.raises(SystemExit):
        compare.main(["--deadline-seconds", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        compare.main(["--learning-rate", "-1e-3", "--out", str(tmp_path)])
    recipe = compare._recipe_from_args(compare.parse_args(["--recipe", "cpu", "--learning-rate", "1e-3"]))
    assert recipe.learning_rate == 1e-3 and "lr 0.001" in recipe.describe()


def test_compare_deadline_too_short_skips_runs(tmp_path, capsys):
    argv = [
        "--recipe",
        "cpu",
        "--models",
        "rnn",
        "--seeds",
        "0",
        "1",
        "--deadline-seconds",
        "5",
        "--out",
        str(tmp_path),
    ]
    assert compare.main(argv) == 0
    assert "rnn seed 0: skipped" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


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
