"""`m2rnn_jax.bench.step_profile`: HLO sources from real compiled text, trace parsing (device streams counted once),
and the CLI end to end on a tiny preset."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from m2rnn_jax.bench import step_profile
from m2rnn_jax.layers.mlp import swiglu


def _compiled_swiglu_text() -> str:
    x = jnp.ones((4, 8), jnp.float32)
    return jax.jit(lambda a, b: swiglu(a, b) * 2.0).lower(x, x).compile().as_text()


def test_instruction_sources_name_the_project_frame():
    sources = step_profile.instruction_sources(_compiled_swiglu_text())
    named = {value["source"] for value in sources.values()}
    assert any(source.startswith("layers/mlp.py:swiglu:") for source in named), named


def test_direction_reads_transpose():
    assert step_profile.direction("jit(f)/transpose(jvp(g))/dot_general") == "backward"
    assert step_profile.direction("jit(f)/jvp(g)/dot_general") == "forward"


def _trace() -> dict:
    return {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 10, "ts": 0, "dur": 3000.0, "name": "gemm_a", "args": {"hlo_op": "dot.1"}},
            {"ph": "X", "pid": 1, "tid": 10, "ts": 5, "dur": 1000.0, "name": "loop_fusion", "args": {"hlo_op": "f.2"}},
            {"ph": "X", "pid": 1, "tid": 11, "ts": 0, "dur": 4000.0, "name": "dot.1", "args": {"hlo_op": "dot.1"}},
            {"ph": "X", "pid": 2, "tid": 5, "ts": 0, "dur": 9000.0, "name": "host work", "args": {}},
        ]
    }


def test_device_events_count_streams_once():
    kernels, threads = step_profile.device_events(_trace())
    assert sorted(event["name"] for event in kernels) == ["gemm_a", "loop_fusion"]
    assert threads == {"Stream #13(Compute)": 4.0, "XLA Ops": 4.0}


def test_summarize_groups_per_source_and_direction():
    kernels, _ = step_profile.device_events(_trace())
    sources = {
        "dot.1": {"op_name": "jit(s)/transpose(jvp())/dot_general", "source": "layers/mlp.py:__call__:10"},
        "f.2": {"op_name": "jit(s)/jvp()/add", "source": "layers/norm.py:__call__:5"},
    }
    summary = step_profile.summarize(kernels, sources, steps=2, top=10)
    assert summary["device_ms_per_step"] == pytest.approx(2.0)
    lines = {row["name"]: row["ms"] for row in summary["by_source_line"]}
    assert lines == {"layers/mlp.py:__call__:10 backward": 1.5, "layers/norm.py:__call__:5 forward": 0.5}
    files = {row["name"]: row["percent"] for row in summary["by_source_file"]}
    assert files == {"layers/mlp.py": 75.0, "layers/norm.py": 25.0}


def test_cli_on_a_tiny_preset(tmp_path, capsys):
    out = tmp_path / "summary.json"
    args = ["--model", "tiny-hybrid", "--batch", "1", "--seq-len", "16", "--steps", "1", "--top", "5"]
    assert step_profile.main([*args, "--out", str(tmp_path / "trace"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["device_ms_per_step"] > 0
    assert summary["by_source_file"] and summary["by_source_line"] and summary["by_kernel"]
    assert "device time" in capsys.readouterr().out


def test_cli_rejects_bad_steps(tmp_path):
    with pytest.raises(SystemExit):
        step_profile.main(["--model", "tiny-hybrid", "--steps", "0", "--out", str(tmp_path)])


def test_kernels_inside_command_buffers_map_by_fusion_name():
    kernels = [{"name": "loop_convert_fusion_72", "dur": 2000.0, "args": {"hlo_op": "command_buffer_3"}}]
    sources = {"loop_convert_fusion.72": {"op_name": "jit(s)/jvp()/convert", "source": "layers/norm.py:__call__:9"}}
    summary = step_profile.summarize(kernels, sources, steps=1)
    assert summary["by_source_line"][0]["name"] == "layers/norm.py:__call__:9 forward"


def _outer(x):
    return _middle(x) + 1.0


def _middle(x):
    return swiglu(x, x) * 3.0


def test_stacks_are_walked_from_the_innermost_frame_to_its_callers():
    x = jnp.ones((4, 8), jnp.float32)
    text = jax.jit(_outer).lower(x).compile().as_text()
    tables = step_profile._tables(text)
    chains = [step_profile._project_frames(frame, tables) for frame in tables["StackFrames"]]
    # swiglu's multiply is called from _middle, called from _outer: the test module is outside the project, so only
    # swiglu's frame is named, and no chain names a project frame twice or a frame that did not call it
    swiglu_chains = [chain for chain in chains if chain and chain[0].startswith("layers/mlp.py:swiglu:")]
    assert swiglu_chains and all(len(chain) == 1 for chain in swiglu_chains)
    innermost = [chain[0] for chain in chains if chain and chain[0].startswith("(")]
    assert any("_middle" in name or "_outer" in name for name in innermost), innermost
