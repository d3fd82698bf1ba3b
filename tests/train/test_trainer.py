"""The training loop: resume is bit-identical and writes its outputs; gradient accumulation is exact."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from m2rnn_jax.data.sources import make_source
from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.train.optimizer import build_optimizer, learning_rate_schedule
from m2rnn_jax.train.state import create_train_state, model_graphdef
from m2rnn_jax.train.step import make_eval_step, make_train_step
from m2rnn_jax.train.trainer import Trainer
from tests.train.tiny import tiny_train_config


def _params(trainer: Trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]


def test_resume_continues_bit_identically(tmp_path, capsys):
    config = tiny_train_config(steps=4)
    straight = Trainer(config, tmp_path / "straight")
    assert straight.run() == 0

    first = Trainer(config, tmp_path / "resumed")
    assert first.run(stop_after=2) == 0
    assert first.checkpointer.latest_step() == 2
    capsys.readouterr()
    second = Trainer(config, tmp_path / "resumed")
    assert "resumed from step 2" in capsys.readouterr().out
    assert second.step == 2
    assert second.run() == 0

    for a, b in zip(_params(straight), _params(second), strict=True):
        np.testing.assert_array_equal(a, b)
    # The run wrote its metrics, the TensorBoard events and the length-generalization report.
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert any(r["kind"] == "eval_len8" for r in records)
    assert (tmp_path / "straight" / "length_generalization.png").stat().st_size > 0
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))


def test_gradient_accumulation_matches_the_full_batch():
    config = tiny_train_config()
    optimizer = build_optimizer(config.optimizer, config.steps)
    schedule = learning_rate_schedule(config.optimizer, config.steps)
    graphdef = model_graphdef(config.model)
    mesh = build_mesh({"data": 1})
    state, _ = create_train_state(config.model, optimizer, config.seed, mesh)
    rows = slice(0, config.batch_size)
    batch = make_source(config.data, config.model.vocab_size).train_batch(0, 8, config.batch_size, rows)
    full_state, full = jax.jit(make_train_step(graphdef, optimizer, schedule, 1))(state, batch)
    accum_state, accum = jax.jit(make_train_step(graphdef, optimizer, schedule, 4))(state, batch)
    for key in ("loss", "grad_norm", "accuracy", "tokens"):
        np.testing.assert_allclose(float(accum[key]), float(full[key]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fresh_state_takes_the_seed_as_an_argument_of_one_program():
    """create_train_state gives the state of init_train_state(seed) (a seed baked in), and the jitted init it runs has
    the same program for every seed (so the next seed's init is a compilation-cache hit)."""
    from m2rnn_jax.train.state import init_train_state, seed_keys

    config = tiny_train_config()
    optimizer = build_optimizer(config.optimizer, config.steps)
    state, _ = create_train_state(config.model, optimizer, 7, build_mesh({"data": 1}))
    baked = jax.jit(lambda: init_train_state(config.model, optimizer, 7))()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(baked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    init = jax.jit(lambda keys: init_train_state(config.model, optimizer, keys))
    assert init.lower(seed_keys(7)).as_text() == init.lower(seed_keys(8)).as_text()
    other, _ = create_train_state(config.model, optimizer, 8, build_mesh({"data": 1}))
    pairs = zip(jax.tree.leaves(other.params), jax.tree.leaves(state.params), strict=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)  # the seed still matters


def test_loss_on_the_last_position_counts_one_token_per_sequence():
    """data.loss_positions="last": the train step's loss and accuracy are those of the final position alone."""
    config = tiny_train_config()
    last = config.__class__(**{**config.__dict__, "data": dataclasses.replace(config.data, loss_positions="last")})
    optimizer = build_optimizer(config.optimizer, config.steps)
    schedule = learning_rate_schedule(config.optimizer, config.steps)
    state, _ = create_train_state(config.model, optimizer, config.seed, build_mesh({"data": 1}))
    step = jax.jit(make_train_step(model_graphdef(config.model), optimizer, schedule, 1))
    rows = slice(0, config.batch_size)
    batch = make_source(last.data, config.model.vocab_size).train_batch(0, 8, config.batch_size, rows)
    _, metrics = step(state, batch)
    assert float(metrics["tokens"]) == config.batch_size
    unmasked = {key: value for key, value in batch.items() if key != "loss_mask"}
    _, everywhere = step(state, unmasked)
    assert float(everywhere["tokens"]) == config.batch_size * 8
    sums = make_eval_step(model_graphdef(config.model))(state.params, unmasked)
    assert float(metrics["accuracy"]) == float(sums["correct_last"]) / config.batch_size
