"""The H200 script: it parses, refuses bad arguments before starting anything, and its ``--plan`` (the jobs it would
start, nothing run) splits and times every call as its header says. Its jobs run in ``h200.sh {1|2|3|4|5} --smoke``
(minutes on a CPU, not part of the suite)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("h200.sh")
MODELS = {"m2rnn", "gru", "rnn", "gdn", "gdn-neg", "mamba2", "attention"}


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True)


def plan(tmp_path: Path, call: int, **env: str) -> list[tuple[str, int, list[str]]]:
    """(job name, second of its kill, command words) of every job of ``call``."""
    done = run_script(tmp_path, str(call), "--plan", **env)
    assert done.returncode == 0, done.stderr
    jobs = []
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"(\S+) \(until (-?\d+)s\): (.*)", line)
        assert match, line
        jobs.append((match[1], int(match[2]), match[3].split()))
    assert not (tmp_path / "out").exists()  # a plan starts nothing, writes nothing
    return jobs


def costs() -> dict[str, int]:
    """The script's COST table (estimated GPU seconds of one run)."""
    table = re.search(r"declare -A COST=\((.*)\)", SCRIPT.read_text())[1]
    return {name: int(value) for name, value in re.findall(r"\[([\w-]+)\]=(\d+)", table)}


def flag_values(words: list[str], flag: str) -> list[str]:
    start = words.index(flag) + 1
    end = next((i for i in range(start, len(words)) if words[i].startswith("--")), len(words))
    return words[start:end]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("8",), {}, "usage: OUT=DIR bash"),
        (("1", "--fast"), {}, "usage: OUT=DIR bash"),
        (("times", "--fast"), {}, "usage: OUT=DIR bash"),
        (("1",), {"JOBS": "0"}, "JOBS: expected a positive integer, got '0'"),
        (("2",), {"BUDGET": "100"}, "BUDGET: expected an integer >= 300 (seconds), got '100'"),
        (("6",), {"ANNEAL_DECAY": "-1"}, "ANNEAL_DECAY: expected a non-negative number, got '-1'"),
        (("6",), {"ANNEAL_LR": "0"}, "ANNEAL_LR: expected a number in (0, 1], got '0'"),
        (("6",), {"ANNEAL_FRACTION": "1.5"}, "ANNEAL_FRACTION: expected a number in (0, 1], got '1.5'"),
        (("6",), {"ANNEAL_MIN_RATIO": "x"}, "ANNEAL_MIN_RATIO: expected a number in (0, 1], got 'x'"),
        (("7",), {"SEED": "-1"}, "SEED: expected a non-negative integer, got '-1'"),
        (("7",), {"SCRATCH_GROUP": "s3"}, "SCRATCH_GROUP: expected a5 or s5, got 's3'"),
    ],
)
def test_bad_arguments_start_nothing(tmp_path, args, env, message):
    done = run_script(tmp_path, *args, **env)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_cost_table_covers_every_model():
    assert set(costs()) == MODELS


@pytest.mark.parametrize("jobs", [1, 2, 3, 7, 9])
def test_call_1_splits_the_figure_over_jobs_processes(tmp_path, jobs):
    cost = costs()
    planned = plan(tmp_path, 1, JOBS=str(jobs))
    assert [name for name, _, _ in planned] == [f"s3_{i + 1}" for i in range(min(jobs, len(MODELS)))]
    groups = [flag_values(words, "--models") for _, _, words in planned]
    assert sorted(m for group in groups for m in group) == sorted(MODELS)  # every model once
    for _, _, words in planned:
        assert flag_values(words, "--seeds") == ["0", "1", "2"] and flag_values(words, "--groups") == ["s3"]
        assert flag_values(words, "--recipe") == ["gpu"] and "--stack-seeds" in words  # one program per model
    for group in groups:  # the cheapest run first: time it leaves goes to the costly ones
        assert [cost[m] for m in group] == sorted(cost[m] for m in group)
    loads = [sum(cost[m] for m in group) for group in groups]
    assert max(loads) - min(loads) <= max(cost.values())  # balanced to within one model


def test_call_1_default_is_two_processes(tmp_path):
    assert len(plan(tmp_path, 1)) == 2


@pytest.mark.parametrize("budget", [300, 540, 600])
@pytest.mark.parametrize("call", [1, 2, 3, 4, 5, 6, 7])
def test_every_job_is_killed_before_the_reports(tmp_path, call, budget):
    for name, until, _ in plan(tmp_path, call, BUDGET=str(budget)):
        assert until <= budget - 30, name  # the last 30 s: reports, archive, printing


def test_call_2_and_3_jobs(tmp_path):
    assert [name for name, _, _ in plan(tmp_path, 2)] == ["a5", "a5_large", "probe_m2rnn", "probe_rnn"]
    a5 = plan(tmp_path, 2)[0][2]
    assert set(flag_values(a5, "--models")) == MODELS and flag_values(a5, "--seeds") == ["0"]
    assert "--stack-seeds" not in a5  # one seed: nothing to stack
    small, small_bf16 = plan(tmp_path, 3)
    assert small[0] == "s3_small" and "model.dtype=bfloat16" not in small[2]
    assert small_bf16[0] == "s3_small_bf16" and small_bf16[2][-2:] == ["--set", "model.dtype=bfloat16"]


@pytest.mark.parametrize("budget", [300, 540])
@pytest.mark.parametrize(("call", "group"), [(4, "a5"), (5, "s5")])
def test_calls_4_and_5_train_one_large_preset_alone_for_the_whole_budget(tmp_path, call, group, budget):
    # alone even with JOBS=2: at V = n|G| the step is compute-bound, two at once halve each one's steps
    [(name, until, words)] = plan(tmp_path, call, BUDGET=str(budget), JOBS="2")
    assert (name, until) == (f"{group}_large", budget - 120)
    assert words[:3] == ["python3", "-m", "experiments.state_tracking"]  # the preset sweep: SIGTERM evaluates
    assert flag_values(words, "--groups") == [group] and flag_values(words, "--size") == ["large"]
    assert flag_values(words, "--seeds") == ["0"] and flag_values(words, "--out")[0].endswith(f"call{call}/{name}")
    assert "--set" not in words  # the preset as it is


def test_call_6_anneals_the_saved_probes_one_after_another(tmp_path):
    """Each run continues a saved CPU model in the repo (the same cell flags as the file), anneals by the clock
    (the step rate at 64 is not measured) and evaluates to 8x its training length."""
    planned = plan(tmp_path, 6, JOBS="2")  # one at a time even with JOBS=2
    assert [(name, until) for name, until, _ in planned] == [("anneal_a5", 290), ("anneal_s5", 510)]
    root = SCRIPT.parents[2]
    for (name, _, words), group, length in zip(planned, ["a5", "s5"], [64, 16], strict=True):
        assert (root / flag_values(words, "--init")[0]).is_file()  # a saved CPU model in the repo
        assert flag_values(words, "--anneal-fraction") == ["0.6"] and flag_values(words, "--min-lr-ratio") == ["0.01"]
        assert "--anneal-steps" not in words and int(flag_values(words, "--steps")[0]) >= 10**7  # constant schedule
        assert flag_values(words, "--group") == [group] and flag_values(words, "--train-length") == [str(length)]
        assert flag_values(words, "--eval-length") == [str(8 * length)]
        assert [flag_values(words, flag) for flag in ("--heads", "--k", "--v")] == [["8"], ["4"], ["64"]]
        assert flag_values(words, "--save")[0].endswith(f"{name}.npz")


def test_call_6_takes_the_decay_and_the_saved_models_from_the_environment(tmp_path):
    default = plan(tmp_path, 6)
    assert all(flag_values(words, "--weight-decay") == ["0"] for _, _, words in default)
    planned = plan(tmp_path, 6, ANNEAL_DECAY="1.0", ANNEAL_A5_INIT="a.npz", ANNEAL_S5_INIT="s.npz")
    assert [flag_values(words, "--weight-decay") for _, _, words in planned] == [["1.0"], ["1.0"]]
    assert [flag_values(words, "--init") for _, _, words in planned] == [["a.npz"], ["s.npz"]]


def test_call_6_takes_the_schedule_from_the_environment(tmp_path):
    """Row 43's constant low rate with decay on the GPU: ANNEAL_LR=1e-5 ANNEAL_MIN_RATIO=1 ANNEAL_DECAY=1.0."""
    default = plan(tmp_path, 6)[0][2]
    assert [flag_values(default, flag) for flag in ("--lr", "--anneal-fraction")] == [["1e-3"], ["0.6"]]
    words = plan(tmp_path, 6, ANNEAL_LR="1e-5", ANNEAL_FRACTION="1", ANNEAL_MIN_RATIO="1", ANNEAL_DECAY="1.0")[0][2]
    assert [flag_values(words, flag) for flag in ("--lr", "--anneal-fraction", "--min-lr-ratio", "--weight-decay")] == [
        ["1e-5"],
        ["1"],
        ["1"],
        ["1.0"],
    ]


@pytest.mark.parametrize(
    ("group", "seed", "curriculum", "final"),
    [("a5", "0", ["4", "8", "16", "32", "64", "64"], 64), ("s5", "2", ["4", "4", "8", "16"], 16)],
)
def test_call_7_chains_three_stages_from_scratch(tmp_path, group, seed, curriculum, final):
    """From scratch at 1e-3 through the curriculum, then the anneal at the final length, then 1e-5 with weight
    decay 1.0; each stage continues the previous one's saved model, one after another even with JOBS=2."""
    planned = plan(tmp_path, 7, JOBS="2", SEED=seed, SCRATCH_GROUP=group)
    prefix = f"scratch_{group}_s{seed}"
    assert [(name, until) for name, until, _ in planned] == [
        (f"{prefix}_curriculum", 255),
        (f"{prefix}_anneal", 435),
        (f"{prefix}_decay", 510),
    ]
    (_, _, first), (_, _, second), (_, _, third) = planned
    assert "--init" not in first and flag_values(first, "--train-length") == curriculum
    assert flag_values(second, "--init") == flag_values(first, "--save")
    assert flag_values(third, "--init") == flag_values(second, "--save")
    for words in (second, third):
        assert flag_values(words, "--train-length") == [str(final)]
    assert [flag_values(words, "--lr") for words in (first, second, third)] == [["1e-3"], ["1e-3"], ["1e-5"]]
    assert flag_values(second, "--anneal-fraction") == ["0.6"] and flag_values(second, "--min-lr-ratio") == ["0.01"]
    assert flag_values(third, "--weight-decay") == ["1.0"] and "--weight-decay" not in first + second
    assert [flag_values(words, "--eval-length") for words in planned_words(planned)] == [
        [str(4 * final)],
        [str(4 * final)],
        [str(8 * final)],
    ]
    for words in planned_words(planned):
        assert flag_values(words, "--group") == [group] and flag_values(words, "--seed") == [seed]
        assert flag_values(words, "--batch-size") == ["512"] and int(flag_values(words, "--steps")[0]) >= 10**7


def planned_words(planned: list[tuple[str, int, list[str]]]) -> list[list[str]]:
    return [words for _, _, words in planned]
