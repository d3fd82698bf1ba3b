"""The probe's dynamics: the stepwise states read out as the probe does, and the two extremes of a cell's memory
(a cell that forgets everything but the last token, one that keeps its state) measured as such."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.state_tracking import dynamics, probe
from m2rnn_jax.data.state_tracking import get_group, running_products

S3 = get_group("s3")


def _params(query: str = "fixed", forget_logit: float | None = None, zero_w: bool = False) -> probe.Params:
    params = probe.init_params("m2rnn", S3.order, 1, heads=2, k=2, v=8, key=jax.random.key(1), query=query)
    if forget_logit is not None:
        params["f"] = jnp.full_like(params["f"], forget_logit)
    if zero_w:
        params["w"] = jnp.zeros_like(params["w"])
    return params


def _tokens(batch: int = 16, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, S3.order, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("query", ["fixed", "token"])
def test_stepwise_states_give_the_probe_s_predictions(query):
    params, tokens = _params(query), _tokens()
    states, predictions = dynamics.from_zero_state(params, tokens)
    assert states.shape == (12, 16, 2, 2, 8)
    expected = jnp.argmax(probe.logits("m2rnn", params, jnp.asarray(tokens), backend="scan"), axis=-1)
    np.testing.assert_array_equal(predictions, expected)
    _, final = probe.recurrent_features("m2rnn", params, jnp.asarray(tokens), "scan")
    np.testing.assert_allclose(states[-1], final, rtol=1e-5, atol=1e-6)


def test_equal_product_prefixes_keep_the_product_and_the_suffix():
    tokens = _tokens(batch=64)
    other = dynamics.equal_product_prefixes(S3, tokens, at=5, seed=3)
    np.testing.assert_array_equal(running_products(S3, other)[:, 4:], running_products(S3, tokens)[:, 4:])
    np.testing.assert_array_equal(other[:, 5:], tokens[:, 5:])
    assert (other[:, :5] != tokens[:, :5]).any(axis=1).mean() > 0.9


def test_a_cell_of_the_last_token_only_synchronises_at_once():
    # W = 0 and forget ~ 0: the state after a token is tanh(k v^T) of that token alone
    params = _params(forget_logit=-40.0, zero_w=True)
    tokens = _tokens()
    targets, clean = running_products(S3, tokens), dynamics.from_zero_state(params, tokens)
    result = dynamics.synchronisation(params, S3, tokens, clean, at=4, seed=0)
    assert result["after"]["0"]["distance_ratio"] > 0.1  # the two prefixes end in different tokens
    assert result["after"]["1"] == {"distance_ratio": 0.0, "agreement": 1.0}
    response = dynamics.perturbation_response(params, tokens, targets, clean, at=4, eps=0.1, key=jax.random.key(0))
    assert response["initial_distance"] == pytest.approx(0.1 * np.sqrt(2 * 2 * 8), rel=0.3)
    assert response["after"]["1"]["distance_ratio"] == 0.0
    assert all(row["accuracy"] == row["accuracy_clean"] for row in response["after"].values())


def test_a_cell_that_keeps_its_state_never_contracts_a_perturbation():
    params = _params(forget_logit=40.0)  # forget = 1 in float32: H_t = H_{t-1}
    tokens = _tokens()
    targets, clean = running_products(S3, tokens), dynamics.from_zero_state(params, tokens)
    response = dynamics.perturbation_response(params, tokens, targets, clean, at=4, eps=0.1, key=jax.random.key(0))
    assert list(response["after"]) == ["1", "2", "4", "8"]
    for row in response["after"].values():
        assert row["distance_ratio"] == pytest.approx(1.0, rel=1e-5)
    unperturbed = dynamics.perturbation_response(params, tokens, targets, clean, at=4, eps=0.0, key=jax.random.key(0))
    assert all(row["distance_ratio"] == 0.0 for row in unperturbed["after"].values())


def test_parameter_summary_reads_forget_values_and_norms():
    params = _params(forget_logit=0.0)
    params["w"] = params["w"].at[1].set(3.0 * jnp.eye(8))
    summary = dynamics.parameter_summary(params)
    assert summary["forget_quantiles"]["0.5"] == pytest.approx(0.5)
    assert summary["w_spectral_norm"][1] == pytest.approx(3.0)


def test_offsets_within():
    assert dynamics.offsets_within(8) == [1, 2, 4, 8]
    assert dynamics.offsets_within(12) == [1, 2, 4, 8, 12]
    assert dynamics.offsets_within(1) == [1]


def test_command_reads_a_saved_probe(tmp_path, capsys):
    saved, out = tmp_path / "probe.npz", tmp_path / "dynamics.json"
    cell = ["--group", "s3", "--heads", "2", "--k", "2", "--v", "8"]
    argv = ["--cell", "m2rnn", *cell, "--train-length", "3", "--steps", "3", "--eval-length", "3"]
    assert probe.main(argv + ["--eval-sequences", "4", "--save", str(saved)]) == 0
    argv = ["--init", str(saved), *cell, "--length", "10", "--sequences", "8", "--at", "3", "--eps", "0", "0.1"]
    assert dynamics.main(argv + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step"] == 3 and len(result["accuracy"]) == 10
    assert [response["eps"] for response in result["perturbation"]] == [0.0, 0.1]
    assert list(result["synchronisation"]["after"]) == ["0", "1", "2", "4", "7"]
    assert "synchronisation at 3:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--at", "8", "--length", "8"], "--at: expected less than --length (8)"),
        (["--eps", "-1"], "--eps: expected non-negative"),
        (["--heads", "0"], "--heads: expected a positive int"),
    ],
)
def test_command_rejects_bad_flags(tmp_path, capsys, flags, message):
    saved = tmp_path / "probe.npz"
    saved.write_bytes(b"")
    with pytest.raises(SystemExit):
        dynamics.main(["--init", str(saved), *flags])
    assert message in capsys.readouterr().err


def test_command_rejects_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dynamics.main(["--init", str(tmp_path / "nothing.npz")])
    assert "--init: expected a probe --save file" in capsys.readouterr().err
