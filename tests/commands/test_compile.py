"""``m2rnn-jax compile``: the train step compiled ahead of time for a virtual TPU topology (libtpu, no TPU).

The unit tests of the mesh parser, the divisibility checks and the HLO collective counter run in this process. The
``tpu_aot`` tests start subprocesses whose PYTHONPATH begins with .venv-tpu (libtpu from .ci/install_tpu.sh), as
tests/kernels/test_tpu_aot.py does, so this pytest process never loads the TPU plugin: one compile of a tiny preset
on v5e:2x2 (every JSON field checked), and the error cases (exit status 2 with a message naming the argument).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2rnn_jax.bench.collectives import COLLECTIVE_KINDS, count_collectives, shape_bytes
from m2rnn_jax.bench.compile import (
    CompileRequest,
    check_divisibility,
    chip_name,
    parse_mesh,
    requested_train_config,
    tpu_model_config,
)
from m2rnn_jax.models import get_preset

REPO = Path(__file__).resolve().parents[2]

# A 4-chip v5e, M2RNN + attention hybrid (tiny-m2rnn: MMAM, 4 M2RNN heads), data x tensor so that the kernel runs
# under shard_map over batch and heads, the parameters are split over tensor and the gradients are reduced.
TINY = [
    "--preset",
    "tiny-m2rnn",
    "--topology",
    "v5e:2x2",
    "--mesh",
    "data=2,tensor=2",
    "--batch",
    "4",
    "--seq-len",
    "32",
    "--remat",
    "full",
]


# ------------------------------------------------------------------------------------------------ unit tests (CPU)


def test_parse_mesh_reads_axes_and_rejects_bad_text():
    assert parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp=-1,expert=8") == {"fsdp": -1, "expert": 8}
    for text, fragment in [
        ("", "at least one"),
        ("data=2,pipe=2", "AXIS=SIZE"),
        ("data=0", "positive size"),
        ("data=x", "positive size"),
        ("data=2,data=2", "each axis once"),
        ("data", "AXIS=SIZE"),
    ]:
        with pytest.raises(ValueError, match=f"--mesh: expected.*{fragment}"):
            parse_mesh(text)


def test_chip_name():
    assert chip_name("v5p:4x4x4") == "v5p"
    for bad in ("v5e", "v5e:", "v5e:2x", ":2x2"):
        with pytest.raises(ValueError, match="--topology: expected CHIP:DIMS"):
            chip_name(bad)


def test_divisibility_errors_name_the_argument():
    dense = get_preset("tiny-m2rnn")  # 4 M2RNN heads, dense MLP
    moe = get_preset("tiny-hybrid-moe")  # 4 experts
    sizes = {"data": 2, "fsdp": 2, "tensor": 1, "expert": 1}
    check_divisibility(dense, sizes, batch=8, grad_accum=2)
    with pytest.raises(ValueError, match=r"--batch: expected a multiple of --grad-accum=3, got 8"):
        check_divisibility(dense, sizes, batch=8, grad_accum=3)
    with pytest.raises(ValueError, match=r"--batch: expected the micro-batch .* 4 batch shards"):
        check_divisibility(dense, sizes, batch=6, grad_accum=1)
    with pytest.raises(ValueError, match=r"--mesh: expected tensor to divide the 4 M2RNN heads.*tensor=8"):
        check_divisibility(dense, {**sizes, "tensor": 8}, batch=8, grad_accum=1)
    with pytest.raises(ValueError, match=r"--mesh: expected expert to divide .*dense MLP"):
        check_divisibility(dense, {**sizes, "expert": 2}, batch=8, grad_accum=1)
    with pytest.raises(ValueError, match=r"--mesh: expected expert to divide the model's MoE experts \(4\)"):
        check_divisibility(moe, {**sizes, "expert": 8}, batch=32, grad_accum=1)
    check_divisibility(moe, {**sizes, "expert": 4}, batch=16, grad_accum=1)


def test_tpu_model_config_forces_the_tpu_backends_and_remat():
    config = tpu_model_config(get_preset("tiny-hybrid"), "save_dots")
    assert config.m2rnn.backend == "pallas_tpu"
    assert config.gated_deltanet.backend == "chunked"
    assert config.remat == "save_dots"
    assert tpu_model_config(get_preset("tiny-m2rnn"), None).remat == get_preset("tiny-m2rnn").remat
    tiny_moe = get_preset("tiny-hybrid-moe")  # widths 64 / 32: not for the megablox kernels
    assert tpu_model_config(tiny_moe, None).mlp.grouped_matmul == "ragged_dot"
    wide = tiny_moe.replace(hidden_size=128, mlp=dataclasses.replace(tiny_moe.mlp, intermediate_size=128))
    assert tpu_model_config(wide, None).mlp.grouped_matmul == "megablox"


def test_request_validation():
    with pytest.raises(ValueError, match="batch: expected a positive int, got 0"):
        CompileRequest(preset="tiny-m2rnn", topology="v5e:2x2", mesh={}, batch=0)
    with pytest.raises(ValueError, match="remat: expected one of"):
        CompileRequest(preset="tiny-m2rnn", topology="v5e:2x2", mesh={}, batch=1, remat="some")
    with pytest.raises(ValueError, match="layers: expected a positive int or None, got 0"):
        CompileRequest(preset="tiny-m2rnn", topology="v5e:2x2", mesh={}, batch=1, layers=0)


def test_requested_train_config_applies_overrides_and_cuts_the_layers():
    """--set edits the preset's training config; --layers keeps the first blocks and drops unused mixer configs."""
    base = requested_train_config(CompileRequest(preset="tiny-hybrid", topology="v5e:2x2", mesh={}, batch=1))
    assert base.model == get_preset("tiny-hybrid")
    request = CompileRequest(
        preset="tiny-hybrid",
        topology="v5e:2x2",
        mesh={},
        batch=1,
        layers=1,
        overrides=("model.vocab_size=64", "model.m2rnn.num_heads=2"),
    )
    config = requested_train_config(request).model
    assert (config.num_layers, config.layer_pattern) == (1, base.model.layer_pattern[:1])
    assert config.vocab_size == 64 and config.m2rnn.num_heads == 2
    kept = {"M": "m2rnn", "G": "gated_deltanet", "A": "attention"}[config.layer_pattern]
    for field in ("m2rnn", "gated_deltanet", "attention"):
        assert (getattr(config, field) is not None) == (field == kept), field
    too_deep = CompileRequest(preset="tiny-hybrid", topology="v5e:2x2", mesh={}, batch=1, layers=99)
    with pytest.raises(ValueError, match=r"--layers: expected at most the model's \d+ layers, got 99"):
        requested_train_config(too_deep)
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        requested_train_config(
            CompileRequest(preset="tiny-m2rnn", topology="v5e:2x2", mesh={}, batch=1, overrides=("model.nope=1",))
        )


HLO = """
HloModule jit_train_step, is_scheduled=true
%fused (p: f32[4]) -> f32[4] { ... }
ENTRY %main {
  %p0 = bf16[8,128]{1,0} parameter(0)
  %all-gather-start.1 = (bf16[8,128]{1,0}, bf16[16,128]{1,0}) all-gather-start(bf16[8,128]{1,0} %p0), dimensions={0}
  %all-gather-done.1 = bf16[16,128]{1,0} all-gather-done((bf16[8,128]{1,0}, bf16[16,128]{1,0}) %all-gather-start.1)
  %all-reduce.2 = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={{0,1}}, to_apply=%add
  %all-reduce-start.3 = f32[10]{0} all-reduce-start(f32[10]{0} %y), to_apply=%add
  %all-reduce-done.3 = f32[10]{0} all-reduce-done(f32[10]{0} %all-reduce-start.3)
  %reduce-scatter.4 = f32[2,64]{1,0} reduce-scatter(f32[4,64]{1,0} %z), dimensions={0}
  %all-to-all.5 = (s32[4]{0}, s32[4]{0}) all-to-all(s32[4]{0} %a, s32[4]{0} %b)
  %add.6 = f32[1024]{0} add(f32[1024]{0} %all-reduce.2, f32[1024]{0} %all-reduce.2)
  ROOT %collective-permute.7 = u8[3]{0} collective-permute(u8[3]{0} %c), source_target_pairs={{0,1}}
}
"""


def test_count_collectives_counts_async_pairs_once_with_result_bytes():
    counts = count_collectives(HLO)
    assert set(counts) == set(COLLECTIVE_KINDS)
    assert counts["all-gather"] == {"count": 1, "bytes": 16 * 128 * 2}
    assert counts["all-reduce"] == {"count": 2, "bytes": 1024 * 4 + 10 * 4}
    assert counts["reduce-scatter"] == {"count": 1, "bytes": 2 * 64 * 4}
    assert counts["all-to-all"] == {"count": 1, "bytes": 2 * 4 * 4}
    assert counts["collective-permute"] == {"count": 1, "bytes": 3}
    assert count_collectives("%add = f32[2]{0} add(f32[2]{0} %a, f32[2]{0} %b)")["all-reduce"]["count"] == 0


def test_shape_bytes():
    assert shape_bytes("bf16[2,3]{1,0}") == 12
    assert shape_bytes("(f32[4]{0}, s8[]{:T(128)}, token[])") == 17
    assert shape_bytes("f32[]") == 4


# ------------------------------------------------------------------------------- ahead-of-time compiles (libtpu)


def _cli(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "m2rnn_jax", "compile", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


@pytest.mark.tpu_aot
def test_tiny_preset_compiles_for_v5e_with_every_report_field(libtpu_env, tmp_path):
    out = tmp_path / "report.json"
    result = _cli(libtpu_env, TINY + ["--json", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tiny-m2rnn on v5e:2x2 (4 x TPU v5 lite), mesh data=2,fsdp=1,context=1,tensor=2,expert=1" in result.stdout
    report = json.loads(out.read_text())
    assert set(report) == {
        "preset",
        "topology",
        "chip",
        "num_devices",
        "mesh",
        "batch",
        "micro_batch",
        "grad_accum",
        "seq_len",
        "micro_batch_per_device",
        "remat",
        "backends",
        "dtype",
        "param_dtype",
        "jax_version",
        "libtpu_version",
        "num_params",
        "replicated_parameters",
        "lower_seconds",
        "compile_seconds",
        "memory",
        "cost",
        "collectives",
        "status",
        "error",
        "layers",
        "layer_pattern",
        "overrides",
        "host_peak_rss_bytes",
        "moe",
    }
    assert report["mesh"] == {"data": 2, "fsdp": 1, "context": 1, "tensor": 2, "expert": 1}
    assert (report["layers"], report["layer_pattern"], report["overrides"]) == (None, "MMAM", [])
    assert 2**27 < report["host_peak_rss_bytes"] < 2**35
    assert (report["num_devices"], report["chip"], report["status"], report["error"]) == (
        4,
        "TPU v5 lite",
        "fits",
        None,
    )
    assert (report["batch"], report["micro_batch"], report["micro_batch_per_device"]) == (4, 4, 2)
    assert report["backends"] == {"m2rnn": "pallas_tpu"} and report["remat"] == "full"
    assert report["moe"] is None  # a dense model
    assert report["libtpu_version"] and report["num_params"] > 100_000
    memory = report["memory"]
    assert memory["hbm_bytes"] == 16 * 2**30 and memory["fits"] is True
    parts = ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes")
    # temporaries may be 0 at this size (the fused optimizer update left none; optax's conditional needed 17 MiB)
    assert all(memory[key] > 0 for key in parts if key != "temp_bytes") and memory["temp_bytes"] >= 0
    assert memory["total_bytes"] == sum(memory[key] for key in parts) - memory["alias_bytes"]
    assert memory["alias_bytes"] > 0  # the state is donated: outputs reuse the argument buffers
    assert memory["fraction_of_hbm"] == pytest.approx(memory["total_bytes"] / memory["hbm_bytes"])
    # fp32 params + 2 Adam moments, about half of them on each tensor shard: arguments >= 12 bytes * params / 2
    assert memory["argument_bytes"] >= 12 * report["num_params"] / 2
    # forward + backward >= 6 FLOPs per parameter per token on each device's 2 rows (tensor halves the matmuls)
    tokens_per_device = 2 * 32
    assert report["cost"]["flops"] >= 6 * report["num_params"] * tokens_per_device / 2 / 2
    assert report["cost"]["bytes_accessed"] > 0
    collectives = report["collectives"]
    assert set(collectives) == set(COLLECTIVE_KINDS)
    assert collectives["all-reduce"]["count"] > 0 and collectives["all-reduce"]["bytes"] > 0  # gradients over data
    assert report["compile_seconds"] >= report["lower_seconds"] > 0


@pytest.mark.tpu_aot
def test_moe_compiles_expert_parallel_on_the_megablox_kernels(libtpu_env, tmp_path):
    """One block of the tiny MoE hybrid on fsdp=2, expert=2: the all-to-all dispatch and the megablox kernels
    compile with libtpu (the 7B presets' configuration in miniature)."""
    out = tmp_path / "report.json"
    args = ["--preset", "tiny-hybrid-moe", "--topology", "v5e:2x2", "--mesh", "fsdp=2,expert=2", "--batch", "4"]
    widths = ["--set", "model.hidden_size=128", "--set", "model.mlp.intermediate_size=128"]  # megablox widths
    result = _cli(libtpu_env, args + widths + ["--seq-len", "32", "--layers", "1", "--json", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["moe"] == {"dispatch": "all_to_all", "grouped_matmul": "megablox"}
    assert report["status"] == "fits" and report["collectives"]["all-to-all"]["count"] >= 4


@pytest.mark.tpu_aot
def test_bad_requests_exit_2_with_a_message(libtpu_env):
    """All error cases in one subprocess (one libtpu start-up): each runs the CLI's main and records its exit."""
    cases = [
        (["--mesh", "data=3"], "does not match the 4 available devices"),
        (["--mesh", "data=2,tensor=2", "--batch", "3"], "--batch: expected the micro-batch"),
        (["--topology", "v5e:2x4", "--mesh", "tensor=8"], "--mesh: expected tensor to divide the 4 M2RNN heads"),
        (["--mesh", "data=2,expert=2"], "--mesh: expected expert to divide"),
        (["--topology", "v5e:3x7"], "--topology: libtpu cannot describe the topology 'v5e:3x7'"),
        (["--topology", "v5p:4x4x4", "--mesh", "data=8,fsdp=8"], "--mesh: expected axis sizes that are products"),
        (["--topology", "v9z:2x2"], "--topology"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--layers", "9"], "--layers: expected at most the model's 4 layers, got 9"),
        (["--set", "model.nope=1"], "unknown key 'nope'"),
    ]
    script = (
        "import contextlib, io, json, sys\n"
        "from m2rnn_jax.cli import main\n"
        "base = ['compile', '--preset', 'tiny-m2rnn', '--topology', 'v5e:2x2', '--mesh', 'data=4', '--seq-len', '8']\n"
        "results = []\n"
        "for extra in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(base + extra)\n"
        "    results.append([code, err.getvalue()])\n"
        "print('RESULTS ' + json.dumps(results))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps([extra for extra, _ in cases])],
        cwd=REPO,
        env=libtpu_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    for (extra, fragment), (code, stderr) in zip(cases, json.loads(lines[0][len("RESULTS ") :])):
        assert code == 2, (extra, stderr)
        assert stderr.startswith("m2rnn-jax compile: error: ") and fragment in stderr, (extra, stderr)


def test_missing_libtpu_is_a_usage_error(tmp_path):
    """Without libtpu on the path the command says how to get it (exit 2); skipped where libtpu is installed."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed in this environment")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    result = _cli(env, ["--preset", "tiny-m2rnn", "--topology", "v5e:2x2", "--mesh", "data=4"])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "m2rnn-jax compile: error: --topology: the TPU compiler (libtpu) is not importable" in result.stderr


def _report(**changes):
    report = {
        "preset": "p",
        "topology": "v5e:2x2",
        "chip": "TPU v5 lite",
        "num_devices": 4,
        "mesh": {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1},
        "batch": 8,
        "micro_batch": 8,
        "grad_accum": 1,
        "seq_len": 16,
        "micro_batch_per_device": 2,
        "remat": "none",
        "num_params": 2_000_000,
        "replicated_parameters": [],
        "compile_seconds": 3.0,
        "lower_seconds": 1.0,
        "error": None,
        "layers": None,
        "layer_pattern": "MMAM",
        "overrides": [],
        "host_peak_rss_bytes": 3 * 2**29,
        "memory": {
            "argument_bytes": 3 * 2**30,
            "output_bytes": 2**20,
            "alias_bytes": 2**20,
            "temp_bytes": 1536,
            "total_bytes": 3 * 2**30 + 1536,
            "hbm_bytes": 16 * 2**30,
            "fraction_of_hbm": 0.1875,
            "fits": True,
        },
        "cost": {"flops": 1.5e12, "bytes_accessed": 2**21},
        "collectives": {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVE_KINDS},
    }
    report.update(changes)
    return report


def test_format_report_lines():
    from m2rnn_jax.bench.compile import format_report

    collectives = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVE_KINDS}
    collectives["all-reduce"] = {"count": 3, "bytes": 5 * 2**20}
    text = format_report(_report(collectives=collectives, replicated_parameters=["['a']['kernel']"]))
    assert "p on v5e:2x2 (4 x TPU v5 lite), mesh data=4,fsdp=1,tensor=1,expert=1" in text
    assert "arguments 3.00 GiB, outputs 1.00 MiB (aliased 1.00 MiB), temporaries 1.50 KiB" in text
    assert "of 16.00 GiB HBM (18.8%) -> fits" in text
    assert "1.5e+12 FLOP, 2.00 MiB accessed" in text
    assert "collectives: all-reduce 3 (5.00 MiB)" in text and "all-gather" not in text
    assert "replicated (size not divisible by the mesh): 1 parameters, e.g. ['a']['kernel']" in text
    assert "compiled in 3.0 s (trace + lower 1.0 s), host peak RSS 1.50 GiB" in text
    assert "p (2 layers: MM) on v5e:2x2" in format_report(_report(layers=2, layer_pattern="MM"))
    refused = format_report(
        _report(
            error="RESOURCE_EXHAUSTED: Ran out of memory",
            cost=None,
            collectives=None,
            memory={"hbm_bytes": 16 * 2**30, "fits": False},
        )
    )
    assert "DOES NOT FIT (16.00 GiB HBM): RESOURCE_EXHAUSTED: Ran out of memory" in refused


# ------------------------------------------------------------------------------ compile-cost regressions (no libtpu)


def test_buffer_assignment_reader_sums_hbm_allocations_by_kind():
    from m2rnn_jax.bench.tpu_buffer_assignment import hbm_allocations

    dump = (
        "allocation 0: size 512, thread-local:\n"
        "allocation 1: size 4096, parameter 9, shape |f32[32,32]| at ShapeIndex {}, maybe-live-out:\n"
        "allocation 2: size 1024, parameter 3, shape |f32[256]| at ShapeIndex {}:\n"
        " value: <1 x @0> (size=1024,offset=0): f32[256]\n"
        "allocation 3: size 65536, preallocated-temp:\n"
        "allocation 4: size 99999, color 1, preallocated-temp:\n"
        "allocation 5: size 64, constant:\n"
    )
    assert hbm_allocations(dump) == {"thread-local": 512, "parameter": 5120, "preallocated-temp": 65536, "constant": 64}


def test_swiglu_splits_the_kernel_not_the_activations():
    """The SwiGLU's interleaved [gate, up] split is a stride-2 slice of the (in, 2I) kernel, never of a (..., 2I)
    activation: libtpu generates code per activation row for the latter (a 400M train step's compile ran out of
    host memory; experiments/RESULTS.md, session 6)."""
    import jax
    import jax.extend.core as jax_core
    import jax.numpy as jnp
    from flax import nnx

    from m2rnn_jax.layers.mlp import MLP, MLPConfig, MoE, MoEConfig

    def strided_slice_operands(module, x):
        graphdef, state = nnx.split(module)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
        found = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "slice" and any(s not in (None, 1) for s in eqn.params["strides"] or ()):
                    found.append(eqn.invars[0].aval.shape)
                for sub in jax_core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return found

    x = jnp.ones((2, 5, 8), jnp.float32)
    mlp = MLP(8, MLPConfig(intermediate_size=6), num_layers=2, rngs=nnx.Rngs(0))
    assert strided_slice_operands(mlp, x) == [(8, 12), (8, 12)]  # the kernel's even and odd columns
    moe = MoE(
        8,
        MoEConfig(num_experts=4, top_k=2, intermediate_size=6, shared_intermediate_size=4),
        num_layers=2,
        rngs=nnx.Rngs(0),
    )
    shapes = strided_slice_operands(moe, x)
    assert shapes and all(shape in {(4, 8, 12), (8, 8)} for shape in shapes), shapes
