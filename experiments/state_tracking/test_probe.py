"""The recurrence-only probe: both cells train, read every position from the recurrence alone, and learn S3's table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.state_tracking import probe


@pytest.mark.parametrize(
    "cell, query, readout",
    [
        ("rnn", "fixed", "linear"),
        ("m2rnn", "fixed", "linear"),
        ("m2rnn", "token", "linear"),
        ("m2rnn", "fixed", "token_mlp"),
        ("rnn", "fixed", "token_mlp"),
    ],
)
def test_logits_are_causal(cell, query, readout):
    params = probe.init_params(
        cell, order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0), query=query, readout=readout
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 6, size=(3, 5)), jnp.int32)
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % 6)
    first, second = probe.logits(cell, params, tokens), probe.logits(cell, params, changed)
    assert first.shape == (3, 5, 6)
    np.testing.assert_allclose(first[:, :3], second[:, :3], rtol=1e-6)  # positions before 4 do not see token 4
    assert not np.allclose(first[:, 3], second[:, 3])


@pytest.mark.parametrize("cell", ["rnn", "m2rnn"])
def test_probe_learns_the_s3_table(tmp_path, cell, capsys):
    out = tmp_path / "result.json"
    argv = ["--cell", cell, "--group", "s3", "--train-length", "2", "--steps", "300", "--width", "32"]
    argv += ["--heads", "2", "--k", "2", "--v", "16", "--eval-length", "4", "--eval-sequences", "64"]
    assert probe.main(argv + ["--lr", "1e-2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps_done"] == 300 and len(result["curves"]["position"]) == 4
    assert result["curves"]["position"][1] > 0.9  # the product of two elements: chance is 1/6
    assert f"{cell} s3: 300/300 steps" in capsys.readouterr().out


def test_probe_curriculum_trains_every_length(capsys):
    argv = ["--cell", "rnn", "--group", "s3", "--train-length", "2", "3", "--steps", "20", "--width", "8"]
    assert probe.main(argv + ["--eval-length", "3", "--eval-sequences", "8"]) == 0
    out = capsys.readouterr().out
    assert "step 10: length 2" in out and "step 12: length 3" in out


def test_probe_rejects_bad_flags():
    with pytest.raises(SystemExit):
        probe.main(["--steps", "0"])
    with pytest.raises(SystemExit):
        probe.main(["--seconds", "-1"])
    with pytest.raises(SystemExit):
        probe.main(["--train-length", "4", "0"])


def test_token_query_reads_the_query_of_each_token():
    params = probe.init_params("m2rnn", order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0), query="token")
    assert params["q"].shape == (6, 2, 2)
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    base = probe.logits("m2rnn", params, tokens)
    moved = dict(params, q=params["q"].at[3].multiply(-1.0))  # only token 3's query changes
    changed = probe.logits("m2rnn", moved, tokens)
    np.testing.assert_allclose(changed[:, :2], base[:, :2], rtol=1e-6)
    assert not np.allclose(changed[:, 2], base[:, 2])


def test_token_mlp_readout_sees_the_current_token_beside_the_state():
    """With ``token_mlp`` the logits at t change with token t's readout embedding alone (the decoders' token path);
    the linear readout has no such table."""
    params = probe.init_params("m2rnn", order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0), readout="token_mlp")
    assert (
        params["token"].shape == (6, 8) and params["hidden"].shape == (2 * 4 + 8, 8) and params["out"].shape == (8, 6)
    )
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    base = probe.logits("m2rnn", params, tokens)
    moved = dict(params, token=params["token"].at[3].multiply(-1.0))  # only token 3's readout embedding changes
    changed = probe.logits("m2rnn", moved, tokens)
    np.testing.assert_allclose(changed[:, :2], base[:, :2], rtol=1e-6)
    assert not np.allclose(changed[:, 2], base[:, 2])
    assert "token" not in probe.init_params("m2rnn", order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0))


@pytest.mark.parametrize("cell", ["rnn", "m2rnn"])
@pytest.mark.parametrize("chunk, segment", [(1, None), (2, None), (3, None), (None, 2), (1, 3), (2, 4)])
def test_segments_without_noise_equal_one_pass(cell, chunk, segment):
    """Chunks and segments only change where the state is handed on (and the gradient), not the outputs; 7 tokens
    leave a shorter last chunk for every chunk size tried."""
    params = probe.init_params(cell, order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 6, size=(3, 7)), jnp.int32)
    whole = probe.logits(cell, params, tokens)
    pieces = probe.logits(cell, params, tokens, chunk=chunk, segment=segment)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "m2rnn"])
def test_segment_stops_the_gradient_at_its_boundaries(cell):
    """With --segment 4 the loss at positions 5-8 gets no gradient from token 0's table entries (seen only at
    position 1, in the first segment); in one pass, and with the state handed on in chunks without a segment, it
    does."""
    params = probe.init_params(cell, order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0))
    tokens = jnp.asarray([[0, 1, 2, 3, 4, 5, 1, 2]], jnp.int32)
    table = "embed" if cell == "rnn" else "k"

    def late_loss(params, **levers):
        return probe.logits(cell, params, tokens, **levers)[:, 4:].sum()

    def grad_of_token_0(**levers):
        return np.abs(np.asarray(jax.grad(lambda p: late_loss(p, **levers))(params)[table][0])).max()

    assert grad_of_token_0(segment=4) == 0.0
    assert grad_of_token_0() > 1e-6 and grad_of_token_0(chunk=4) > 1e-6
    early = jax.grad(lambda p: probe.logits(cell, p, tokens, segment=4)[:, 1:4].sum())(params)[table][0]
    assert np.abs(np.asarray(early)).max() > 1e-6  # inside the segment the gradient flows


def test_state_noise_is_sigma_per_entry_per_step():
    """With the forget value at 1 the M2RNN state only accumulates the noise: after t tokens it is the sum of t
    draws, so the output y_t = H_t^T q has standard deviation sigma sqrt(t) |q| (per head); position 1 reads the
    zero state."""
    sigma, batch = 0.1, 4096
    params = probe.init_params("m2rnn", order=6, width=8, heads=2, k=3, v=4, key=jax.random.key(0))
    params = dict(params, f=jnp.full_like(params["f"], 100.0))  # sigmoid(100) = 1 in float32
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 6, size=(batch, 5)), jnp.int32)
    features = probe.segmented_features("m2rnn", params, tokens, "scan", chunk=1, noise=sigma, key=jax.random.key(3))
    features = np.asarray(features).reshape(batch, 5, 2, 4)
    np.testing.assert_allclose(features[:, 0], 0.0, atol=1e-7)
    norms = np.linalg.norm(np.asarray(params["q"]), axis=-1)  # (heads,)
    for t in (2, 3, 5):
        std = features[:, t - 1].std(axis=(0, 2))  # per head
        np.testing.assert_allclose(std, sigma * np.sqrt(t - 1) * norms, rtol=0.05)
    every_two = probe.segmented_features("m2rnn", params, tokens, "scan", chunk=2, noise=sigma, key=jax.random.key(3))
    every_two = np.asarray(every_two).reshape(batch, 5, 2, 4)
    np.testing.assert_allclose(every_two[:, 1], 0.0, atol=1e-7)  # the first draw lands after token 2
    np.testing.assert_allclose(every_two[:, 4].std(axis=(0, 2)), sigma * np.sqrt(2) * norms, rtol=0.05)


def test_state_noise_changes_only_training_and_depends_on_the_key():
    params = probe.init_params("m2rnn", order=6, width=8, heads=2, k=2, v=4, key=jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 6, size=(2, 6)), jnp.int32)
    clean = probe.logits("m2rnn", params, tokens)
    noisy = [probe.logits("m2rnn", params, tokens, chunk=1, noise=0.1, key=jax.random.key(s)) for s in (0, 0, 1)]
    np.testing.assert_allclose(noisy[0][:, 0], clean[:, 0], rtol=1e-6)  # the first output precedes any noise
    assert not np.allclose(noisy[0][:, 1:], clean[:, 1:])
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0][:, 1:], noisy[2][:, 1:])
    with pytest.raises(ValueError, match="key"):
        probe.logits("m2rnn", params, tokens, chunk=1, noise=0.1)
    with pytest.raises(ValueError, match="segment"):
        probe.logits("m2rnn", params, tokens, chunk=2, segment=3)


def test_probe_trains_with_noise_and_segments(tmp_path, capsys):
    """A curriculum whose second stage (length 6) is cut into segments of 2, with state noise: it still learns S3's
    table, and the result records the levers and the loss log."""
    out = tmp_path / "result.json"
    argv = ["--cell", "m2rnn", "--group", "s3", "--train-length", "2", "6", "--steps", "300", "--heads", "2"]
    argv += ["--k", "2", "--v", "16", "--eval-length", "6", "--eval-sequences", "64", "--lr", "1e-2"]
    argv += ["--segment", "2", "--state-noise", "0.01", "--out", str(out)]
    assert probe.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["args"]["segment"] == 2 and result["args"]["state_noise"] == 0.01
    assert result["curves"]["position"][1] > 0.9
    assert [entry["length"] for entry in result["log"]][:2] == [2, 2] and result["log"][-1]["length"] == 6
    assert "length 6" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags",
    [
        ["--state-noise", "-0.1"],
        ["--noise-every", "0"],
        ["--segment", "0"],
        ["--segment", "3", "--state-noise", "0.1", "--noise-every", "2"],
        ["--log-seconds", "0"],
    ],
)
def test_probe_rejects_bad_lever_flags(flags):
    with pytest.raises(SystemExit):
        probe.main(flags)


def test_save_and_init_continue_the_run(tmp_path, capsys):
    """--init resumes a --save file: the step count continues (steps_done counts both runs), and the saved
    parameters are what the resumed run starts from; a file saved with other cell flags is refused."""
    saved = tmp_path / "state.npz"
    argv = ["--cell", "m2rnn", "--group", "s3", "--train-length", "2", "--steps", "40", "--heads", "2", "--k", "2"]
    argv += ["--v", "8", "--eval-length", "3", "--eval-sequences", "8"]
    trained = tmp_path / "trained.json"
    assert probe.main(argv + ["--steps", "20", "--save", str(saved), "--out", str(trained)]) == 0
    out = tmp_path / "resumed.json"
    assert probe.main(argv + ["--steps", "20", "--init", str(saved), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps_done"] == 20 and result["start_step"] == 20 and result["log"] == []  # nothing left to do
    assert result["curves"] == json.loads(trained.read_text())["curves"]  # the saved parameters, evaluated again
    fresh = probe.init_params("m2rnn", order=6, width=256, heads=2, k=2, v=8, key=jax.random.key(0))
    loaded, _, step = probe.load_state(saved, fresh, probe.make_optimizer(3e-3, 40).init(fresh))
    assert step == 20 and not np.allclose(loaded["w"], fresh["w"])  # trained, not the init
    params = probe.init_params("m2rnn", order=6, width=256, heads=2, k=2, v=8, key=jax.random.key(0))
    opt_state = optax.adam(1e-3).init(params)
    with pytest.raises(ValueError, match="other flags"):
        probe.load_state(saved, params, opt_state)  # a different optimizer state
    assert probe.main(argv + ["--steps", "30", "--init", str(saved), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps_done"] == 30 and result["start_step"] == 20 and result["log"][0]["step"] == 21
    assert probe.main(argv + ["--steps", "+5", "--init", str(saved), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps_done"] == 25 and result["start_step"] == 20  # +N: N more than the saved count


def test_learning_rate_default_is_warmup_cosine_to_a_tenth():
    """Without --anneal-steps the schedule is the one every earlier probe run used (optax's warmup cosine)."""
    schedule = probe.learning_rate(1e-3, 1000)
    reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000, 1e-4)
    for step in (0, 50, 100, 400, 999, 1000, 5000):
        np.testing.assert_allclose(float(schedule(step)), float(reference(step)), rtol=1e-6, atol=1e-12)


def test_learning_rate_anneal_holds_then_decays_to_the_floor():
    schedule = probe.learning_rate(1e-3, 1000, min_lr_ratio=0.01, anneal_steps=200)
    for step in (100, 500, 800):
        np.testing.assert_allclose(float(schedule(step)), 1e-3, rtol=1e-6)  # the peak holds until 1000 - 200
    np.testing.assert_allclose(float(schedule(900)), 1e-3 * (1 + 0.01) / 2, rtol=1e-5)  # the cosine's midpoint
    np.testing.assert_allclose(float(schedule(1000)), 1e-5, rtol=1e-5)
    assert float(schedule(850)) > float(schedule(900)) > float(schedule(950))


@pytest.mark.parametrize(
    "flags",
    [
        ["--min-lr-ratio", "-0.1"],
        ["--min-lr-ratio", "1.5"],
        ["--anneal-steps", "0"],
        ["--steps", "1000", "--anneal-steps", "901"],  # more than --steps less the warmup of 100
        ["--steps", "+0"],
        ["--steps", "ten"],
        ["--steps", "+5", "--init", "/nonexistent/state.npz"],
        ["--weight-decay", "-0.1"],
    ],
)
def test_probe_rejects_bad_schedule_flags(flags, capsys):
    with pytest.raises(SystemExit):
        probe.main(flags)
    assert flags[-2] in capsys.readouterr().err


def test_timed_anneal_holds_then_follows_a_cosine_to_the_floor():
    assert probe.timed_anneal(0.0, 100.0, 0.4, 0.01) == 1.0
    assert probe.timed_anneal(60.0, 100.0, 0.4, 0.01) == 1.0  # the anneal starts at 100 - 40
    np.testing.assert_allclose(probe.timed_anneal(80.0, 100.0, 0.4, 0.01), (1 + 0.01) / 2)
    np.testing.assert_allclose(probe.timed_anneal(100.0, 100.0, 0.4, 0.01), 0.01)
    np.testing.assert_allclose(probe.timed_anneal(130.0, 100.0, 0.4, 0.01), 0.01)  # past the end: the floor


def test_probe_anneals_by_the_clock(tmp_path):
    """--anneal-fraction 1: every logged step carries its rate factor, falling from ~1 towards --min-lr-ratio."""
    out = tmp_path / "annealed.json"
    argv = ["--cell", "m2rnn", "--group", "s3", "--train-length", "3", "--steps", "100000", "--heads", "2"]
    argv += ["--k", "2", "--v", "8", "--eval-length", "3", "--eval-sequences", "8", "--batch-size", "8"]
    argv += ["--seconds", "8", "--anneal-fraction", "1", "--min-lr-ratio", "0.05", "--log-seconds", "0.25"]
    assert probe.main(argv + ["--out", str(out)]) == 0
    factors = [entry["rate_factor"] for entry in json.loads(out.read_text())["log"]]
    assert len(factors) >= 2 and factors == sorted(set(factors), reverse=True)  # strictly falling
    assert all(0.05 <= factor <= 1.0 for factor in factors) and factors[-1] < 0.6  # logged near the end


@pytest.mark.parametrize(
    "flags",
    [
        ["--anneal-fraction", "0.5"],  # no --seconds
        ["--seconds", "10", "--anneal-fraction", "0"],
        ["--seconds", "10", "--anneal-fraction", "1.5"],
        ["--seconds", "10", "--steps", "1000", "--anneal-steps", "10", "--anneal-fraction", "0.5"],
    ],
)
def test_probe_rejects_bad_anneal_fraction(flags, capsys):
    with pytest.raises(SystemExit):
        probe.main(flags)
    assert "--anneal-fraction" in capsys.readouterr().err


def test_weight_decay_shrinks_every_parameter_by_the_rate_times_it():
    params = {"w": jnp.ones((3, 3)), "k": jnp.full((2,), 2.0)}
    optimizer = probe.make_optimizer(1e-2, 1000, anneal_steps=10, weight_decay=0.5)  # constant 1e-2 after warmup
    state = optimizer.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    for _ in range(100):  # past the warmup, where the rate is 1e-2
        updates, state = optimizer.update(zero, state, params)
    updates, state = optimizer.update(zero, state, params)
    np.testing.assert_allclose(updates["w"], -1e-2 * 0.5 * params["w"], rtol=1e-5)
    np.testing.assert_allclose(updates["k"], -1e-2 * 0.5 * params["k"], rtol=1e-5)
    assert not np.any(probe.make_optimizer(1e-2, 1000).update(zero, state, params)[0]["w"])  # default: no decay
