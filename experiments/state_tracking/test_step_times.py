"""step_times: the steps a recipe spends at each length, the run estimates, the command at tiny sizes on a CPU
(table and JSON), and ``h200.sh``'s use of its JSON (COSTS=FILE in ``--plan``, the ``times`` call)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments.state_tracking import step_times
from experiments.state_tracking.recipes import RECIPES, train_config
from experiments.state_tracking.test_h200 import costs, flag_values, plan, run_script
from m2rnn_jax.bench.model import random_batch, train_step_function
from m2rnn_jax.train.state import init_train_state

# The interpreter running the tests first on the script's PATH (it reads a COSTS file with python3).
PYTHON_PATH = f"{Path(sys.executable).parent}:/usr/bin:/bin"


def test_steps_at_lengths_follow_the_curriculum():
    assert step_times.steps_at_lengths(RECIPES["gpu"]) == {32: 900, 128: 2100}
    assert step_times.steps_at_lengths(RECIPES["cpu"]) == {8: 750, 32: 750}
    # stages that end up at the same length add up (the CPU recipe at 2: both stages at length 2)
    assert step_times.steps_at_lengths(RECIPES["cpu"].with_train_length(2)) == {2: 1500}
    for recipe in (RECIPES["gpu"], dataclasses.replace(RECIPES["gpu"], steps=7)):
        assert sum(step_times.steps_at_lengths(recipe).values()) == recipe.steps


def test_run_estimates():
    recipe = RECIPES["gpu"]
    rows = [
        {"model": "gru", "length": 32, "steps": 900, "ms_per_step": 4.0, "compile_s": 2.0},
        {"model": "gru", "length": 128, "steps": 2100, "ms_per_step": 10.0, "compile_s": 3.0},
        {"model": "rnn", "length": 32, "steps": 900, "ms_per_step": 3.0, "compile_s": 1.0},
        {"model": "rnn", "length": 128, "steps": 2100, "error": "JaxRuntimeError: out of memory"},
        {"model": "attention", "length": 128, "steps": 2100, "ms_per_step": 5.0, "compile_s": 4.0},
    ]
    runs = step_times.run_estimates(rows, recipe, ["gru", "rnn", "attention", "mamba2"])
    assert runs["gru"] == {"seconds": pytest.approx(900 * 0.004 + 2100 * 0.010), "compile_s": 5.0}
    assert runs["rnn"] == {"seconds": None, "compile_s": 1.0}  # failed at 128
    assert runs["attention"] == {"seconds": None, "compile_s": 4.0}  # 32 not measured
    assert runs["mamba2"] == {"seconds": None, "compile_s": 0}


TINY = ["--recipe", "cpu", "--train-length", "4", "--hidden-size", "8", "--num-layers", "1", "--batch-size", "2"]


def test_command_at_tiny_sizes_on_cpu(tmp_path, capsys):
    """The real step, compiled and timed (trained at 2: both curriculum stages at one length, one compile)."""
    out = tmp_path / "times" / "step_times.json"
    args = [*TINY, "--train-length", "2", "--models", "rnn", "--iters", "2", "--repeats", "2", "--json", str(out)]
    assert step_times.main(args) == 0
    result = json.loads(out.read_text())
    assert result["recipe"] == "cpu" and result["group"] == "s3" and result["platform"] == jax.devices()[0].platform
    assert (result["batch_size"], result["hidden_size"], result["num_layers"]) == (2, 8, 1)
    assert result["dtype"] == "float32" and result["steps"] == 1500
    assert result["curriculum"] == [[0, 2], [750, 2]] and result["timing"] == {"iters": 2, "repeats": 2}
    ((row),) = result["rows"]
    assert (row["model"], row["length"], row["steps"]) == ("rnn", 2, 1500) and "error" not in row
    assert row["ms_per_step"] > 0 and row["compile_s"] > 0
    assert result["runs"] == {
        "rnn": {"seconds": pytest.approx(1.5 * row["ms_per_step"]), "compile_s": row["compile_s"]}
    }
    printed = capsys.readouterr().out
    assert "model | length | steps | ms/step | compile s" in printed
    assert f"rnn   | 2      | 1500  | {row['ms_per_step']:.3f}" in printed
    assert f"  rnn: {result['runs']['rnn']['seconds']:.1f} s" in printed
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # atomic: no temporary left


def test_the_timed_step_has_the_comparisons_schedule():
    """The step built as :func:`step_times.time_train_step` builds it runs the recipe's schedule (peak lr at the end
    of its warmup, cosine over its steps), not the benchmark's default optimizer."""
    recipe = step_times.recipe_from_args(step_times.parse_args([*TINY, "--train-length", "2"]))
    config = train_config(recipe, "rnn", "s3", seed=0)
    step, optimizer = train_step_function(config.model, config.optimizer, config.steps)
    tokens = random_batch(config.model, config.batch_size, 2)
    rates = {}
    for at in (recipe.warmup_steps, recipe.steps):  # a fresh state each time: the step donates it
        state = init_train_state(config.model, optimizer, 0)
        _, metrics = step(state._replace(step=jnp.asarray(at, state.step.dtype)), tokens)
        rates[at] = float(metrics["learning_rate"])
    assert rates == {
        recipe.warmup_steps: pytest.approx(recipe.learning_rate),
        recipe.steps: pytest.approx(0.1 * recipe.learning_rate),
    }


def test_a_failing_measurement_keeps_the_others(tmp_path, monkeypatch, capsys):
    """One model that fails (out of memory) is recorded as an error row; the JSON is rewritten after every row, so a
    run killed halfway keeps what it measured."""
    out = tmp_path / "step_times.json"
    seen_rows: list[int] = []

    def fake(config, length, timing):
        if out.is_file():
            seen_rows.append(len(json.loads(out.read_text())["rows"]))
        if config.model.layer_pattern.startswith("U"):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return {"ms_per_step": float(length), "compile_s": 1.0}

    monkeypatch.setattr(step_times, "time_train_step", fake)
    assert step_times.main([*TINY, "--models", "rnn", "gru", "--json", str(out)]) == 0
    assert seen_rows == [1, 2, 3]
    result = json.loads(out.read_text())
    assert ["error" in row for row in result["rows"]] == [False, False, True, True]
    assert "RESOURCE_EXHAUSTED" in result["rows"][2]["error"]
    assert result["runs"]["rnn"]["seconds"] == pytest.approx(750 * (2 + 4) / 1e3)
    assert result["runs"]["gru"]["seconds"] is None
    printed = capsys.readouterr().out
    assert "gru: n/a" in printed and "gru at 2: JaxRuntimeError: RESOURCE_EXHAUSTED" in printed


def test_explicit_lengths_off_the_curriculum(monkeypatch, capsys):
    monkeypatch.setattr(
        step_times, "time_train_step", lambda config, length, timing: {"ms_per_step": 1.0, "compile_s": 0.5}
    )
    step_times.main([*TINY, "--models", "rnn", "--lengths", "3"])
    printed = capsys.readouterr().out
    assert "rnn   | 3      | 0     | 1.000" in printed and "rnn: n/a" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iters", "0"], "--iters: expected a positive int, got 0"),
        (["--lengths", "0", "8"], "--lengths: expected positive lengths, got [0, 8]"),
        (["--models", "lstm"], "invalid choice: 'lstm'"),
    ],
)
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        step_times.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def write_costs(path: Path, seconds: dict[str, float | None]) -> Path:
    path.write_text(json.dumps({"runs": {m: {"seconds": s, "compile_s": 1.0} for m, s in seconds.items()}}))
    return path


def test_costs_file_replaces_the_table_in_the_plan(tmp_path):
    measured = {"m2rnn": 60.4, "gru": 9.6, "rnn": 8.2, "gdn": 12.0, "gdn-neg": 13.0, "mamba2": 7.0, "attention": 5.1}
    path = write_costs(tmp_path / "step_times.json", measured)
    groups = [flag_values(words, "--models") for _, _, words in plan(tmp_path, 1, COSTS=str(path), PATH=PYTHON_PATH)]
    # M2RNN, by far the costliest measured, gets a process of its own: the table would have put it with GRU and RNN
    assert groups == [["m2rnn"], ["attention", "mamba2", "rnn", "gru", "gdn", "gdn-neg"]]
    done = run_script(tmp_path, "1", "--plan", COSTS=str(path), PATH=PYTHON_PATH)
    assert f"measured in {path}" in done.stderr and "m2rnn=60 gru=10 rnn=8" in done.stderr


def test_costs_file_with_some_models_keeps_the_table_for_the_others(tmp_path):
    path = write_costs(tmp_path / "partial.json", {"m2rnn": 200.0, "gru": None})
    done = run_script(tmp_path, "1", "--plan", COSTS=str(path), PATH=PYTHON_PATH)
    assert done.returncode == 0, done.stderr
    table = costs()
    assert f"m2rnn=200 gru={table['gru']} rnn={table['rnn']}" in done.stderr
    assert "measured in" in done.stderr and ": m2rnn; the table for the others" in done.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("not json", "JSONDecodeError"),
        ('{"rows": []}', "KeyError"),
        ('{"runs": {"lstm": {"seconds": 3}}}', "expected runs.<model>.seconds for at least one of"),
    ],
)
def test_bad_costs_file_starts_nothing(tmp_path, content, message):
    path = tmp_path / "costs.json"
    if content is not None:
        path.write_text(content)
    done = run_script(tmp_path, "1", "--plan", COSTS=str(path), PATH=PYTHON_PATH)
    assert done.returncode == 2 and "COSTS: expected " in done.stderr and message in done.stderr
    assert not done.stdout and not (tmp_path / "out").exists()


def test_times_call_plan(tmp_path):
    ((name, until, words),) = plan(tmp_path, "times", TIMES_SECONDS="120", JOBS="3")
    assert name == "times" and until == 110  # killed 10 s before TIMES_SECONDS; JOBS does not matter (one process)
    assert words[:3] == ["python3", "-m", "experiments.state_tracking.step_times"]
    assert flag_values(words, "--recipe") == ["gpu"] and "--models" not in words  # every model
    assert flag_values(words, "--json") == [str(tmp_path / "out" / "step_times.json")]


def test_times_call_refuses_a_short_limit(tmp_path):
    done = run_script(tmp_path, "times", TIMES_SECONDS="30")
    assert done.returncode == 2 and "TIMES_SECONDS: expected an integer >= 60 (seconds), got '30'" in done.stderr
    assert not (tmp_path / "out").exists()
