"""Seeds trained as one stacked program (``compare --stack-seeds``) against the one-by-one Trainer runs: the same
losses, parameters and results; a stop then a resume; the whole comparison with the flag."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.state_tracking import compare
from experiments.state_tracking.models import ModelSize
from experiments.state_tracking.recipes import RECIPES, Recipe, train_config
from experiments.state_tracking.run_files import run_directory
from experiments.state_tracking.stacked import StackedTraining, check_seeds, run_stacked, write_results
from m2rnn_jax.ops.m2rnn.backends import resolve_backend_name

# 4 steps at lengths 2 then 4 (the curriculum switches at step 2), width 16, one layer.
TINY = dataclasses.replace(
    RECIPES["cpu"],
    size=ModelSize(hidden_size=16, num_layers=1),
    steps=4,
    batch_size=4,
    lengths=(2, 6),
    eval_sequences=8,
).with_train_length(4)
# One length only (one compile of each train step): for the M2RNN, whose compiles are the slowest on a CPU.
ONE_LENGTH = dataclasses.replace(TINY, curriculum=((0.0, 4),))
SEEDS = (0, 1)
# float32: vmap batches every matmul and reduction over the seed axis, so XLA may tile and sum them in another
# order than the single run's program (observed differences ~1e-7 relative); nothing else differs.
RTOL, ATOL = 1e-5, 1e-6


def train_records(directory: Path) -> list[dict]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def one_by_one(recipe: Recipe, model: str, out: Path) -> list:
    """Each seed trained by the comparison's Trainer; returns the final parameters, writes each result.json."""
    params = []
    for seed in SEEDS:
        config = train_config(recipe, model, "s3", seed)
        trainer = compare._ComparisonTrainer(config, run_directory(out, "s3", model, seed))
        trainer.run()
        params.append(jax.device_get(trainer.state.params))
        # run_one finds the final checkpoint (nothing left to train), evaluates every position, writes result.json
        compare.run_one(recipe, model, "s3", seed, out, compare._StopRequests())
    return params


def stacked_training(model: str, out: Path, recipe: Recipe = TINY) -> StackedTraining:
    """The seeds' stacked training with the files of ``run_stacked`` under ``out``."""
    configs = [train_config(recipe, model, "s3", seed) for seed in SEEDS]
    directories = [run_directory(out, "s3", model, seed) for seed in SEEDS]
    return StackedTraining(configs, directories, out / "runs" / "s3" / model / "stack")


@pytest.mark.parametrize(
    ("model", "recipe", "lengths"),
    [("m2rnn", ONE_LENGTH, [4, 4, 4, 4]), ("gru", TINY, [2, 2, 4, 4])],
    ids=["m2rnn", "gru"],
)
def test_stacked_training_equals_one_by_one(tmp_path, model, recipe, lengths):
    if model == "m2rnn":
        m2rnn = train_config(recipe, model, "s3", 0).model.m2rnn
        assert resolve_backend_name(m2rnn.backend, jnp.float32, m2rnn.v_head_dim) == "scan"
    expected_params = one_by_one(recipe, model, tmp_path / "one")
    training = stacked_training(model, tmp_path / "stacked", recipe)
    assert training.run() == TINY.steps
    for index, params in enumerate(expected_params):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), training.params(index), params
        )
    training.close()
    results = write_results(training, recipe, model, "s3", train_seconds=1.0)
    assert list(results) == list(SEEDS)
    for seed, result in results.items():
        one_dir, stacked_dir = (run_directory(tmp_path / name, "s3", model, seed) for name in ("one", "stacked"))
        one, stacked = train_records(one_dir), train_records(stacked_dir)
        assert [(r["step"], r["seq_len"]) for r in stacked] == list(zip(range(1, 5), lengths))
        assert [(r["step"], r["seq_len"]) for r in one] == [(r["step"], r["seq_len"]) for r in stacked]
        for name in ("loss", "accuracy", "grad_norm", "learning_rate"):
            np.testing.assert_allclose([r[name] for r in stacked], [r[name] for r in one], rtol=RTOL, err_msg=name)
        reference = json.loads((one_dir / "result.json").read_text())
        assert set(result) == set(reference) | {"stacked_seeds"} and result["stacked_seeds"] == list(SEEDS)
        assert result["complete"] and result["steps_done"] == TINY.steps and result["config"] == reference["config"]
        for length, values in reference["at_lengths"].items():
            assert result["at_lengths"][length] == pytest.approx(values, abs=1e-6)
        assert json.loads((stacked_dir / "result.json").read_text()) == result
        assert json.loads((stacked_dir / "config.json").read_text()) == reference["config"]
    assert not training.stack_directory.exists()  # removed once complete


def test_stop_then_resume_reaches_the_unstopped_parameters(tmp_path):
    unstopped = stacked_training("gru", tmp_path / "unstopped")
    unstopped.run()
    unstopped.close()
    # run_stacked asks after steps 1 and 2: stopped after step 2 (the length switch), saved, recorded.
    answers = iter([False, True])
    results = run_stacked(TINY, "gru", "s3", SEEDS, tmp_path / "stopped", lambda: next(answers, False))
    assert [(r["steps_done"], r["complete"]) for r in results] == [(2, False), (2, False)]
    assert (tmp_path / "stopped" / "runs" / "s3" / "gru" / "stack" / "checkpoints" / "2").is_dir()

    resumed = stacked_training("gru", tmp_path / "stopped")
    assert resumed.step == 2
    assert resumed.run() == TINY.steps
    resumed.close()
    # The same compiled program from the same saved state and the same batches: bit-identical.
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, unstopped.state.params)
    assert [r["step"] for r in train_records(run_directory(tmp_path / "stopped", "s3", "gru", 0))] == [1, 2, 3, 4]
    stopped_seconds = {r["seed"]: r["train_seconds"] for r in results}
    results = write_results(resumed, TINY, "gru", "s3", train_seconds=1.0)
    assert all(result["complete"] for result in results.values())
    # The result holds the run's whole time: the stopped sitting's and the resumed one's.
    for seed, result in results.items():
        assert result["sittings"] == 2 and result["train_seconds"] == pytest.approx(stopped_seconds[seed] + 1.0)
    assert not resumed.stack_directory.exists()


@pytest.mark.parametrize("seeds", [[], [0, 1, 0]])
def test_bad_seeds_raise(tmp_path, seeds):
    with pytest.raises(ValueError, match="seeds: expected at least one seed, each once"):
        check_seeds(seeds)
    with pytest.raises(ValueError, match="seeds"):
        run_stacked(TINY, "gru", "s3", seeds, tmp_path)
    assert not (tmp_path / "runs").exists()


def test_configs_differing_beyond_the_seed_raise(tmp_path):
    configs = [train_config(TINY, "gru", "s3", 0), train_config(dataclasses.replace(TINY, steps=5), "gru", "s3", 1)]
    with pytest.raises(ValueError, match="configs: expected configurations that differ only in their seed"):
        StackedTraining(configs, [tmp_path / "a", tmp_path / "b"], tmp_path / "stack")


def test_run_budget_gives_a_stack_its_seeds_shares():
    evaluation = compare.EVALUATION_SECONDS
    assert compare.run_budget(300.0, 6, None, seeds=3) == pytest.approx(3 * (300 / 6 - evaluation))
    assert compare.run_budget(300.0, 6, 50.0, seeds=3) == 50.0  # --run-seconds caps the stacked program
    assert compare.run_budget(None, 6, 50.0, seeds=3) == 50.0
    # Fewer runs fit than the stack has seeds: all the time left less each seed's evaluation, or nothing.
    fit_two = 2.5 * (compare.SHORTEST_RUN_SECONDS + evaluation)
    assert compare.run_budget(fit_two, 6, None, seeds=3) == pytest.approx(fit_two - 3 * evaluation)
    assert compare.run_budget(3 * evaluation, 6, None, seeds=3) == 0.0
    with pytest.raises(ValueError, match="runs_left"):
        compare.run_budget(300.0, 2, None, seeds=3)


def test_stop_checker_answers_signals_and_its_time():
    stops = compare._StopRequests()
    no_limit, expired = stops.checker(None), stops.checker(0.0)
    assert not no_limit() and expired()
    stops.received = True  # what SIGTERM / SIGINT does under compare's handler
    assert no_limit()


def test_stack_seeds_rejects_a_repeated_seed(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--stack-seeds", "--seeds", "0", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def test_compare_with_stack_seeds_end_to_end(tmp_path, capsys):
    argv = [
        "--recipe",
        "cpu",
        "--models",
        "gru",
        "--seeds",
        "0",
        "1",
        "--steps",
        "3",
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
        "--deadline-seconds",
        "600",
        "--stack-seeds",
        "--out",
        str(tmp_path),
    ]
    assert compare.main(argv) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["summary"]["s3"]["gru"]["seeds"] == [0, 1]
    assert [(run["seed"], run["stacked_seeds"], run["steps_done"]) for run in report["runs"]] == [
        (0, [0, 1], 3),
        (1, [0, 1], 3),
    ]
    assert "| GRU |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare_s3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "gru seeds [0, 1] stacked" in out and "s3 gru seed 1: 3/3 steps" in out

    # Finished runs are not trained again, one seed more trains only that one.
    result_path = tmp_path / "runs" / "s3" / "gru" / "s0" / "result.json"
    stamp = result_path.stat().st_mtime_ns
    assert compare.main(argv[:7] + ["2"] + argv[7:]) == 0
    assert result_path.stat().st_mtime_ns == stamp
    added = json.loads((tmp_path / "runs" / "s3" / "gru" / "s2" / "result.json").read_text())
    assert added["stacked_seeds"] == [2] and added["complete"]
