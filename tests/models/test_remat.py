"""ModelConfig.remat as a choice: the same loss and gradients for every choice, the policy really recomputes,
old boolean configs still load, and the choice round-trips through the training config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.models.config import REMAT_CHOICES
from m2rnn_jax.models.decoder import REMAT_POLICIES, Decoder
from m2rnn_jax.models.loss import language_model_loss
from m2rnn_jax.models.presets import tiny_config
from m2rnn_jax.train.config import TrainConfig
from m2rnn_jax.train.overrides import apply_overrides
from tests.train.tiny import tiny_train_config

PATTERN = "MA"


def loss_function(remat: str):
    """(pure loss of the parameters, parameters) of a tiny M2RNN + attention hybrid with the given remat."""
    model = Decoder(tiny_config(PATTERN).replace(remat=remat), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 256, dtype=jnp.int32)

    def loss(params):
        return language_model_loss(nnx.merge(graphdef, params), ids, jnp.roll(ids, -1, axis=1))[0]

    return loss, params


@pytest.fixture(scope="module")
def reference():
    loss, params = loss_function("none")
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", [c for c in REMAT_CHOICES if c != "none"])
def test_every_choice_gives_the_same_loss_and_gradients(reference, remat):
    loss, params = loss_function(remat)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    expected_value, expected_grads = reference
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_policies_change_what_the_backward_recomputes():
    """Counted in the gradient's jaxpr: "full" recomputes the projections, "save_dots" keeps them."""

    def dot_count(remat: str) -> int:
        loss, params = loss_function(remat)
        return str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general")

    counts = {remat: dot_count(remat) for remat in REMAT_CHOICES}
    assert counts["full"] > counts["save_dots"] >= counts["none"], counts


def test_every_choice_has_a_policy():
    assert set(REMAT_POLICIES) | {"none"} == set(REMAT_CHOICES)


def test_booleans_of_old_configs_are_read_and_bad_names_raise():
    config = tiny_config("M")
    assert config.remat == "none"
    assert config.replace(remat=True).remat == "full"
    assert config.replace(remat=False).remat == "none"
    with pytest.raises(ValueError, match=r"remat: expected one of \('none', 'full', 'save_dots'\)"):
        config.replace(remat="dots")


@pytest.mark.parametrize("remat", [True, False, *REMAT_CHOICES])
def test_remat_round_trips_through_the_training_config(remat):
    data = tiny_train_config().to_dict()
    data["model"]["remat"] = remat  # a bool as written by older versions, or a name
    config = TrainConfig.from_dict(json.loads(json.dumps(data)))
    expected = {True: "full", False: "none"}.get(remat, remat)
    assert config.model.remat == expected
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert apply_overrides(config, ["model.remat=save_dots"]).model.remat == "save_dots"
