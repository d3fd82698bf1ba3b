"""The recurrence-only probe: both cells train, read every position from the recurrence alone, and learn S3's table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
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
