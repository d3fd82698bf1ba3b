"""`m2rnn-jax bench --model` (table and every JSON field on a tiny preset), its bad-input errors, the op mode, and
the helpers of m2rnn_jax.bench (timing, report, block functions)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m2rnn_jax.bench import model as model_bench
from m2rnn_jax.bench.report import format_table, write_json
from m2rnn_jax.bench.timing import (
    COMPILE_PHASE_EVENTS,
    compile_phases,
    compile_timed,
    footprint_bytes,
    median_ms,
    temp_bytes,
)
from m2rnn_jax.cli import main
from m2rnn_jax.models.decoder import DecoderBlock
from m2rnn_jax.models.presets import get_preset, list_presets
from m2rnn_jax.train.compile_cache import describe_compile_cache
from m2rnn_jax.train.flops import training_flops_per_token
from m2rnn_jax.train.state import TrainState

PRESET, BATCH, SEQ_LEN = "tiny-m2rnn", 2, 16  # pattern MMAM: two block kinds, M three times
BENCH_ARGS = [
    "bench",
    "--model",
    PRESET,
    "--batch",
    str(BATCH),
    "--seq-len",
    str(SEQ_LEN),
    "--iters",
    "1",
    "--repeats",
    "1",
]
TIMED = ("forward_ms", "fwd_bwd_ms", "forward_temp_gib", "fwd_bwd_temp_gib", "compile_s")


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """(table text, JSON report) of one CLI run on the tiny preset."""
    path = tmp_path_factory.mktemp("bench") / "sub" / "model.json"
    out = io.StringIO()  # capsys is function-scoped: capture the module-scoped run by hand
    with contextlib.redirect_stdout(out):
        assert main([*BENCH_ARGS, "--json", str(path)]) == 0
    return out.getvalue(), json.loads(path.read_text())


def _rows(report, kind):
    return [row for row in report["rows"] if row["kind"] == kind]


def test_model_bench_table_names_every_part(model_run):
    table, _ = model_run
    lines = table.splitlines()
    assert lines[0].startswith(f"{PRESET} on ") and "pattern=MMAM" in lines[0] and f"B={BATCH} S={SEQ_LEN}" in lines[0]
    assert lines[1].split("|")[0].strip() == "part" and "fwd+bwd ms" in lines[1] and "compile s" in lines[1]
    parts = [line.split("|")[0].rstrip() for line in lines[3:] if "|" in line]
    assert parts == [
        "embedding",
        "block M (M2RNN)",
        "  mixer M alone",
        "block A (Attention)",
        "  mixer A alone",
        "lm head + loss",
        "optimizer update",
        "sum of parts",
        "train step (measured)",
    ]
    counts = {part: line.split("|")[1].strip() for part, line in zip(parts, lines[3:])}
    assert counts["block M (M2RNN)"] == "3" and counts["block A (Attention)"] == "1"
    assert lines[-2].startswith("train step: ") and "tokens/s, MFU n/a" in lines[-2]
    assert re.search(r"compile [\d.]+ s \(trace [\d.]+ s, lower [\d.]+ s, backend compile [\d.]+ s\)$", lines[-2])
    assert lines[-1].startswith("sum of parts ") and "vs measured" in lines[-1]


def test_model_bench_json_header(model_run):
    _, report = model_run
    config = get_preset(PRESET)
    keys = {"device", "platform", "jax", "preset", "shapes", "timing", "compile_cache", "rows", "overrides"}
    assert set(report) == keys and report["overrides"] == []  # the CLI's --set assignments
    assert report["compile_cache"] == describe_compile_cache()  # this session's test cache (conftest.py)
    assert report["device"] == jax.devices()[0].device_kind and report["platform"] == jax.devices()[0].platform
    assert report["jax"] == jax.__version__ and report["preset"] == PRESET
    assert report["shapes"] == {
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "tokens_per_step": BATCH * SEQ_LEN,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "layer_pattern": "MMAM",
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
        "remat": config.remat,
        "head_statistics": config.head_statistics,
        "head_logits": config.head_logits,
        "scan_layers": config.scan_layers,
    }
    assert report["timing"] == {"iters": 1, "repeats": 1}
    assert [row["kind"] for row in report["rows"]] == [
        "embedding",
        "block",
        "mixer",
        "block",
        "mixer",
        "head",
        "optimizer",
        "sum",
        "step",
    ]
    assert [row["part"] for row in report["rows"]][:5] == [
        "embedding",
        "block M (M2RNN)",
        "mixer M alone",
        "block A (Attention)",
        "mixer A alone",
    ]


def test_model_bench_json_embedding_block_mixer_and_head_rows(model_run):
    _, report = model_run
    timed_rows = _rows(report, "embedding") + _rows(report, "block") + _rows(report, "mixer") + _rows(report, "head")
    assert len(timed_rows) == 6
    for row in timed_rows:
        for key in TIMED:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, (row["part"], key)
        assert row["forward_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["compile_s"] > 0
    assert [(row["letter"], row["count"]) for row in _rows(report, "block")] == [("M", 3), ("A", 1)]
    assert [(row["letter"], row["count"]) for row in _rows(report, "mixer")] == [("M", 3), ("A", 1)]
    (embedding,) = _rows(report, "embedding")
    assert embedding["count"] == 1 and embedding["letter"] is None
    (head,) = _rows(report, "head")
    assert head["count"] == 1 and head["letter"] is None
    assert head["chunk_tokens"] == BATCH * SEQ_LEN  # one chunk at this size
    assert not any(key.startswith("plain_") for key in head)


def test_model_bench_json_optimizer_row(model_run):
    _, report = model_run
    (row,) = _rows(report, "optimizer")
    assert row["count"] == 1 and row["letter"] is None and row["forward_ms"] is None
    assert row["fwd_bwd_ms"] > 0 and row["fwd_bwd_temp_gib"] >= 0 and row["compile_s"] > 0


def test_model_bench_json_step_and_sum_rows(model_run):
    _, report = model_run
    (step,) = _rows(report, "step")
    (total,) = _rows(report, "sum")
    ms = step["fwd_bwd_ms"]
    assert ms > 0 and step["compile_s"] > 0 and step["fwd_bwd_temp_gib"] > 0
    stages = [step[name] for name in ("trace_s", "lower_s", "backend_compile_s")]
    assert all(seconds > 0 for seconds in stages) and sum(stages) <= step["compile_s"]
    assert step["tokens_per_s"] == pytest.approx(BATCH * SEQ_LEN / (ms / 1e3))
    assert step["flops_per_token"] == training_flops_per_token(get_preset(PRESET), SEQ_LEN)
    assert step["model_tflops_per_s"] == pytest.approx(step["flops_per_token"] * step["tokens_per_s"] / 1e12)
    if jax.default_backend() == "cpu":
        assert step["peak_flops_per_device"] is None and step["mfu"] is None
        assert step["peak_memory_source"] == "memory_analysis"
    assert step["peak_memory_gib"] > step["fwd_bwd_temp_gib"]  # parameters, moments and batch on top
    parts = _rows(report, "embedding") + _rows(report, "block") + _rows(report, "head") + _rows(report, "optimizer")
    expected = sum(row["count"] * row["fwd_bwd_ms"] for row in parts)
    assert total["fwd_bwd_ms"] == pytest.approx(expected)
    assert total["measured_ms"] == ms
    assert total["fraction_of_step"] == pytest.approx(expected / ms)
    assert total["unaccounted_ms"] == pytest.approx(ms - expected)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "tiny-hybrid"),  # the known presets are listed
        (["--model", PRESET, "--batch", "0"], "--batch: expected a positive int, got '0'"),
        (["--model", PRESET, "--seq-len", "-3"], "--seq-len: expected a positive int, got '-3'"),
        (["--model", PRESET, "--shapes", "tiny"], "not allowed with argument"),
        (["--shapes", "tiny", "--batch", "4"], "--batch: only with --model PRESET"),
        (["--shapes", "tiny", "--step-only"], "--step-only: only with --model PRESET"),
        (["--model", PRESET, "--backends", "scan"], "--backends: only in op mode"),
        (["--model", PRESET, "--remat", "sometimes"], "remat: expected one of"),
        (["--model", PRESET, "--head-statistics", "fused"], "head_statistics: expected one of"),
        (["--shapes", "tiny", "--head-statistics", "two_pass"], "--head-statistics: only with --model PRESET"),
        (["--model", PRESET, "--head-logits", "half"], "head_logits: expected one of"),
        (["--shapes", "tiny", "--head-logits", "compute"], "--head-logits: only with --model PRESET"),
        (["--shapes", "tiny", "--set", "m2rnn.gradient_clipping=2"], "--set: only with --model PRESET"),
        (["--model", PRESET, "--set", "m2rnn.clipping=2"], "m2rnn: unknown key 'clipping'"),
        (["--model", PRESET, "--set", "m2rnn.kernel_size"], "--set: expected key.sub=value"),
        (["--model", PRESET, "--set", "m2rnn.kernel_size=0"], "kernel_size: expected a positive"),
    ],
)
def test_bench_bad_input_exits_2(args, message, capsys):
    try:
        code = main(["bench", *args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "m2rnn-jax bench: error: " in err and message in err


def test_help_describes_both_modes_and_dtypes_match_the_config(capsys):
    from m2rnn_jax.commands.bench import DTYPES
    from m2rnn_jax.models.config import SUPPORTED_DTYPES

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "op (default)" in text and "m2rnn-jax bench --model PRESET" in text and "--seq-len S" in text
    assert DTYPES == SUPPORTED_DTYPES  # the CLI keeps its own copy so that building the parser imports no jax


def test_unknown_preset_error_lists_every_preset():
    with pytest.raises(ValueError, match="model: expected one of the presets") as info:
        model_bench.resolve_config("tiny-hybird")
    assert all(name in str(info.value) for name in list_presets())


def test_resolve_config_overrides_dtype_and_remat():
    assert model_bench.resolve_config(PRESET, "bfloat16").dtype == "bfloat16"
    assert model_bench.resolve_config(PRESET, remat="full").remat == "full"
    assert model_bench.resolve_config(PRESET, head_statistics="pallas_gpu").head_statistics == "pallas_gpu"
    assert model_bench.resolve_config(PRESET, head_logits="compute").head_logits == "compute"
    assert model_bench.resolve_config(PRESET).dtype == get_preset(PRESET).dtype
    with pytest.raises(ValueError, match="dtype: expected one of"):
        model_bench.resolve_config(PRESET, "int8")


def test_resolve_config_applies_set_overrides_after_the_options():
    config = model_bench.resolve_config(PRESET, remat="full", overrides=["m2rnn.gradient_clipping=2.5", "remat=none"])
    assert config.m2rnn.gradient_clipping == 2.5 and config.remat == "none"  # the override wins over --remat
    assert config.replace(m2rnn=get_preset(PRESET).m2rnn, remat="none") == model_bench.resolve_config(PRESET)


@pytest.mark.parametrize("batch, seq_len, name", [(0, 16, "batch"), (2, -1, "seq_len"), (2.0, 16, "batch")])
def test_run_model_bench_rejects_bad_shapes_before_any_work(batch, seq_len, name):
    with pytest.raises(ValueError, match=f"{name}: expected a positive int, got"):
        model_bench.run_model_bench(PRESET, get_preset(PRESET), batch, seq_len)


def test_step_only_times_the_step_and_the_optimizer_alone(tmp_path):
    path = tmp_path / "step.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*BENCH_ARGS, "--step-only", "--set", "head_logits=compute", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert [row["kind"] for row in report["rows"]] == ["optimizer", "step"]
    assert report["rows"][1]["tokens_per_s"] > 0 and report["shapes"]["batch"] == BATCH
    assert report["overrides"] == ["head_logits=compute"] and report["shapes"]["head_logits"] == "compute"
    assert out.getvalue().startswith("overrides: head_logits=compute\n")


def test_op_mode_still_runs(tmp_path, capsys):
    path = tmp_path / "op.json"
    assert main(["bench", "--shapes", "tiny", "--iters", "1", "--repeats", "1", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "fwd+bwd ms" in table and "scan" in table
    (row,) = json.loads(path.read_text())["rows"]
    assert row["backend"] == "scan" and row["forward_ms"] > 0 and row["fwd_bwd_ms"] > 0


def test_block_function_matches_the_block_and_remat_keeps_gradients():
    config = get_preset(PRESET)
    block = DecoderBlock("A", config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block)
    x = model_bench.random_hidden(config, 2, 8)
    y, aux = jax.jit(model_bench.block_function(graphdef, "none"))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(block(x)[0]), rtol=1e-6, atol=1e-6)

    def grads(remat):
        loss = lambda p, x: jnp.sum(model_bench.block_function(graphdef, remat)(p, x)[0] ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    plain = jax.tree.leaves(grads("none"))
    for remat in ("full", "save_dots"):
        for expected, actual in zip(plain, jax.tree.leaves(grads(remat))):
            np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_mixer_kinds_in_order_of_first_use():
    assert model_bench.mixer_kinds(get_preset("tiny-m2rnn")) == {"M": 3, "A": 1}
    assert list(model_bench.mixer_kinds(get_preset("tiny-hybrid"))) == list("MGSARU")


def test_time_carried_feeds_each_carry_to_the_next_call():
    seen = []

    def executable(carry, increment):
        seen.append(carry)
        return carry + increment, carry

    ms, last = model_bench.time_carried(executable, 0, 1, timing=model_bench.Timing(iters=2, repeats=3))
    assert ms >= 0 and seen == list(range(1 + 2 * 3)) and last == 7


def test_optimizer_update_function_is_the_steps_update():
    optimizer = optax.adamw(1e-2)
    params = {"w": jnp.arange(4.0)}
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jnp.zeros((2,), jnp.uint32)
    )
    grads = {"w": jnp.ones(4)}
    new_state, norm = model_bench.optimizer_update_function(optimizer)(state, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    np.testing.assert_array_equal(np.asarray(new_state.params["w"]), np.asarray(params["w"] + updates["w"]))
    assert float(norm) == pytest.approx(float(optax.tree.norm(updates)))
    assert int(new_state.opt_state[0].count) == 1


def test_median_ms_carries_state_and_checks_arguments():
    calls = []

    def step():
        calls.append(len(calls))
        return jnp.zeros(())

    assert median_ms(step, iters=3, repeats=2, warmup=1) >= 0
    assert len(calls) == 1 + 3 * 2
    with pytest.raises(ValueError, match="iters: expected a positive int, got 0"):
        median_ms(step, iters=0)


def test_compiled_memory_helpers():
    fn = jax.jit(lambda a: jnp.sin(a) @ a.T)
    compiled = compile_timed(fn, jnp.ones((64, 64), jnp.float32))
    assert compiled.compile_s > 0
    assert set(compiled.phases) == {"trace_s", "lower_s", "backend_compile_s"}
    assert footprint_bytes(compiled.executable) >= 2 * 64 * 64 * 4 + temp_bytes(compiled.executable)


def test_compile_phases_count_top_level_spans():
    """A computation compiled while the function is traced (a constant evaluated eagerly) reports its own stages
    inside the trace's span: they stay part of the trace, sibling spans add up, other events are ignored, and the
    listener goes with the block."""
    trace, lower, backend = (COMPILE_PHASE_EVENTS[name] for name in ("trace_s", "lower_s", "backend_compile_s"))
    with compile_phases() as phases:
        for event, start, end in (
            (lower, 11.0, 11.5),  # nested in the trace (an eager constant's compile)
            (backend, 11.5, 13.0),  # nested
            (trace, 10.0, 14.0),
            (lower, 14.0, 14.5),
            (backend, 14.5, 16.0),
            (backend, 16.0, 16.25),  # a second top-level compile in the block
        ):
            jax.monitoring.record_event_time_span(event, start, end)
        jax.monitoring.record_event_time_span("/jax/some/other_event", 0.0, 100.0)
    assert phases == {"trace_s": 4.0, "lower_s": 0.5, "backend_compile_s": 1.75}
    jax.monitoring.record_event_time_span(trace, 20.0, 28.0)
    assert phases["trace_s"] == 4.0

    def with_eager_constant(a):
        with jax.ensure_compile_time_eval():  # compiled and run while with_eager_constant is traced
            constant = jax.jit(jnp.cos)(np.ones((8,), np.float32))
        return a + constant

    compiled = compile_timed(jax.jit(with_eager_constant), jnp.ones((8,), jnp.float32))
    assert set(compiled.phases) == {"trace_s", "lower_s", "backend_compile_s"}
    assert sum(compiled.phases.values()) <= compiled.compile_s


def test_format_table_and_atomic_json(tmp_path):
    table = format_table((("a", "x", "{:.1f}"), ("bb", "y", "{}")), [{"x": 1.25, "y": None}, {"x": None, "y": "z"}])
    assert table.splitlines() == ["a   | bb", "----+---", "1.2 | -", "-   | z"]
    path = tmp_path / "deep" / "out.json"
    write_json(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


@pytest.mark.gpu
def test_gpu_model_bench_reads_allocator_peak_and_mfu(tmp_path):
    """On a GPU: bf16 blocks (Pallas M2RNN), the allocator's peak, and an MFU in (0, 1) where the peak is known."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    path = tmp_path / "gpu.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*BENCH_ARGS, "--dtype", "bfloat16", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    (step,) = _rows(report, "step")
    assert report["platform"] == "gpu" and report["shapes"]["dtype"] == "bfloat16"
    assert step["peak_memory_source"] == "memory_stats" and step["peak_memory_gib"] > 0
    if step["peak_flops_per_device"] is not None:
        assert 0 < step["mfu"] < 1


def _device_failure(*_args, **_kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99 GiB")


def test_measured_records_device_failures_and_lets_bugs_through():
    row = model_bench.measured(model_bench.part("head", "lm head + loss"), _device_failure)
    assert row["kind"] == "head" and row["error"].startswith("JaxRuntimeError: RESOURCE_EXHAUSTED")
    assert model_bench.measured(model_bench.part("head", "x"), lambda: {"fwd_bwd_ms": 1.0})["fwd_bwd_ms"] == 1.0
    with pytest.raises(ValueError, match="a bug"):
        model_bench.measured(model_bench.part("head", "x"), lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_failed_step_skips_the_optimizer_row(monkeypatch):
    monkeypatch.setattr(model_bench, "compile_timed", _device_failure)
    step, optimizer = model_bench.bench_training(get_preset(PRESET), BATCH, SEQ_LEN, model_bench.Timing(1, 1))
    assert step["kind"] == "step" and "RESOURCE_EXHAUSTED" in step["error"] and "fwd_bwd_ms" not in step
    assert optimizer["kind"] == "optimizer" and optimizer["error"] == "not run: the train step failed"


def _report_with_a_failed_block():
    ok = {"forward_ms": 1.0, "fwd_bwd_ms": 2.0, "forward_temp_gib": 0.5, "fwd_bwd_temp_gib": 1.0, "compile_s": 3.0}
    rows = [
        {**model_bench.part("embedding", "embedding"), **ok},
        {
            **model_bench.part("block", "block G (GatedDeltaNet)", "G", 3),
            "error": "JaxRuntimeError: RESOURCE_EXHAUSTED",
        },
        {**model_bench.part("mixer", "mixer G alone", "G", 3), **ok},
        {**model_bench.part("head", "lm head + loss"), **ok},
        {**model_bench.part("optimizer", "optimizer update"), **ok, "forward_ms": None, "forward_temp_gib": None},
    ]
    step = {
        **model_bench.part("step", "train step (measured)"),
        **ok,
        "forward_ms": None,
        "forward_temp_gib": None,
        "tokens_per_s": 1e3,
        "mfu": 0.25,
        "peak_memory_gib": 2.0,
        "peak_memory_source": "memory_stats",
    }
    rows += [model_bench.sum_of_parts(rows, step["fwd_bwd_ms"]), step]
    shapes = {
        "batch": 1,
        "seq_len": 2,
        "hidden_size": 3,
        "vocab_size": 4,
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "remat": "none",
        "layer_pattern": "GGG",
    }
    return {"preset": "p", "device": "d", "jax": "v", "shapes": shapes, "rows": rows}


def test_report_with_a_failed_part(monkeypatch, capsys):
    report = _report_with_a_failed_block()
    total = report["rows"][-2]
    assert total["fwd_bwd_ms"] is None and total["fraction_of_step"] is None and total["measured_ms"] == 2.0
    text = model_bench.format_report(report)
    assert "sum of parts: n/a (a part or the step failed)" in text and "MFU 25.0%" in text
    assert "| ERROR" in text and text.splitlines()[-1] == "block G (GatedDeltaNet): JaxRuntimeError: RESOURCE_EXHAUSTED"
    assert model_bench.failed_parts(report) == ["block G (GatedDeltaNet)"]
    monkeypatch.setattr(model_bench, "run_model_bench", lambda *args, **kwargs: report)
    assert main(BENCH_ARGS) == 1
    assert "1 part(s) failed: block G (GatedDeltaNet)" in capsys.readouterr().err
