"""Context parallelism end to end on 8 fake CPU devices: whole models and ``m2rnn-jax train`` with ``mesh.context``.

Each test runs ``python -m tests.parallel.test_context_training <check>`` in a subprocess with 8 host devices; the
check prints ``OK <check>``. Default run: ``m2rnn-jax train`` of the tiny state-tracking config (one M2RNN layer)
with context 4 x data 2 ends with the loss of data 8. Slow (``-m slow``): the tiny hybrid with every mixer (MGSARU)
forward, loss and every gradient with context 2, 4, 8 and context x data, with and without documents, and the
issue's command ``m2rnn-jax train --preset tiny-hybrid --set mesh.context=4 --set mesh.data=2`` against data=8.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.parallel.fake_devices import run_on_fake_devices


def _run_check(name: str) -> None:
    lines = run_on_fake_devices("tests.parallel.test_context_training", name, timeout=1800)
    assert f"OK {name}" in lines, lines


def test_train_command_context4_data2_equals_data8() -> None:
    _run_check("train_tiny_state_tracking")


def test_decoding_after_a_context_run_folds_the_context_axis_into_data() -> None:
    _run_check("decoding_after_a_context_run")


@pytest.mark.slow
def test_tiny_hybrid_every_mixer_equals_one_device() -> None:
    _run_check("tiny_hybrid_model")


@pytest.mark.slow
def test_train_tiny_hybrid_context4_data2_equals_data8() -> None:
    _run_check("train_tiny_hybrid")


# ---------------------------------------------------------------- the checks (run in the 8-device subprocess)


def _final_train_loss(argv: list[str], workdir: str) -> float:
    import contextlib
    import io
    import json
    from pathlib import Path

    from m2rnn_jax.cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main(["train", *argv, "--workdir", workdir])
    assert code == 0, output.getvalue()
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"][-1]["loss"]


def _compare_train_runs(name: str, argv: list[str]) -> None:
    """The same run with mesh.context=4, mesh.data=2 and with mesh.data=8 ends with the same loss (float32)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        context = _final_train_loss([*argv, "--set", "mesh.context=4", "--set", "mesh.data=2"], f"{directory}/c")
        data = _final_train_loss([*argv, "--set", "mesh.data=8"], f"{directory}/d")
    assert abs(context - data) < 1e-5 * max(1.0, abs(data)), (context, data)
    print(f"{name}: final loss context4 x data2 {context:.7f}, data8 {data:.7f}")
    print(f"OK {name}")


def _check_train_tiny_state_tracking() -> None:
    import json
    import tempfile

    from tests.train.tiny import tiny_train_config

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as config_file:
        json.dump(tiny_train_config(steps=3, log_every=1).to_dict(), config_file)
    try:
        _compare_train_runs("train_tiny_state_tracking", ["--config", config_file.name])
    finally:
        os.unlink(config_file.name)


def _check_train_tiny_hybrid() -> None:
    _compare_train_runs(
        "train_tiny_hybrid",
        [
            "--preset",
            "tiny-hybrid",
            "--set",
            "steps=3",
            "--set",
            "log_every=1",
            "--set",
            "optimizer.warmup_steps=1",
            "--set",
            "batch_size=8",
            "--set",
            "data.eval_batch_size=8",
        ],
    )


def _check_tiny_hybrid_model() -> None:
    """tiny-hybrid (M2RNN, GDN, SSD, attention, RNN, GRU layers): loss and every parameter gradient under context
    2 x data 4, 4 x data 2 and 8 equal one device (float32 < 1e-5), with and without documents."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m2rnn_jax.models.decoder import Decoder
    from m2rnn_jax.models.loss import head_loss_sums
    from m2rnn_jax.models.presets import get_preset
    from m2rnn_jax.parallel.mesh import build_mesh

    graphdef, params = nnx.split(Decoder(get_preset("tiny-hybrid"), rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 256)
    starts = jnp.zeros((4, 32), jnp.int32).at[0, 9].set(1).at[1, 16].set(1).at[2, 4].set(1)
    segment_ids = jnp.cumsum(starts, axis=1)

    def loss(params, segment_ids):
        head, aux = head_loss_sums(nnx.merge(graphdef, params), tokens[:, :-1], tokens[:, 1:], segment_ids=segment_ids)
        return head.nll_sum / head.weight_sum + aux

    for documents in (None, segment_ids):
        expected = jax.jit(jax.value_and_grad(loss))(params, documents)
        for axes in ({"context": 4, "data": 2}, {"context": 2, "data": 4}, {"context": 8}):
            with jax.set_mesh(build_mesh(axes)):
                got = jax.jit(jax.value_and_grad(loss))(params, documents)
            errors = jax.tree.map(
                lambda a, b: float(jnp.max(jnp.abs(a - b)) / (1.0 + jnp.max(jnp.abs(b)))), got, expected
            )
            error = max(jax.tree.leaves(errors))
            assert error < 1e-5, f"{axes} documents={documents is not None}: max relative error {error:.2e}"
            print(f"tiny_hybrid {axes} documents={documents is not None}: max relative error {error:.1e}")
    print("OK tiny_hybrid_model")


def _check_decoding_after_a_context_run() -> None:
    """Generation refuses the context axis, and runs under without_context(mesh) (what the trainer's end-of-run
    samples use) on the same devices with the same tokens as without a mesh."""
    import jax
    import numpy as np
    from flax import nnx

    from m2rnn_jax.models.decoder import Decoder
    from m2rnn_jax.models.generation import generate
    from m2rnn_jax.models.presets import get_preset
    from m2rnn_jax.parallel.mesh import build_mesh, without_context

    model = Decoder(get_preset("tiny-m2rnn"), rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(2), (2, 5), 0, 256)
    expected = generate(model, prompts, max_new_tokens=4)
    mesh = build_mesh({"data": 2, "context": 4})
    folded = without_context(mesh)
    assert dict(zip(folded.axis_names, folded.devices.shape))["data"] == 8 and folded.shape["context"] == 1
    assert sorted(d.id for d in folded.devices.flat) == sorted(d.id for d in mesh.devices.flat)
    with jax.set_mesh(mesh):
        try:
            generate(model, prompts, max_new_tokens=4)
        except ValueError as error:
            assert "context" in str(error), error
        else:
            raise AssertionError("decoding under a context axis should be refused")
        with jax.set_mesh(folded):
            np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=4), expected)
    print("OK decoding_after_a_context_run")


CHECKS = {
    "decoding_after_a_context_run": _check_decoding_after_a_context_run,
    "train_tiny_state_tracking": _check_train_tiny_state_tracking,
    "train_tiny_hybrid": _check_train_tiny_hybrid,
    "tiny_hybrid_model": _check_tiny_hybrid_model,
}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
