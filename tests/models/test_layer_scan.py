"""``ModelConfig.scan_layers``: runs of equal mixer letters as one ``lax.scan`` give the unrolled decoder's results.

Float64 equality (values, aux loss, per-block states and every parameter gradient) for every mixer kind, every
remat choice, MoE blocks, document masking and decoding with a cache; the traced program of a long run is a fraction
of the unrolled one's (the point of the option); the parameter tree is unchanged. The 8-device check
(tests/parallel/eight_device_checks.py, ``scanned_steps``) trains a scanned model on data/fsdp/tensor meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.layer_scan import layer_runs
from m2rnn_jax.models.presets import tiny_config


def float64_config(pattern: str, **changes):
    return tiny_config(pattern, hidden_size=32, **changes).replace(
        initializer_range=0.1, dtype="float64", param_dtype="float64"
    )


def loss_and_gradients(config, ids, segment_ids=None):
    """(loss, logits, aux loss, per-block states, parameter gradients) of a model built from seed 0."""
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
        out = nnx.merge(graphdef, params)(ids, segment_ids=segment_ids)
        return jnp.mean(jnp.sin(out.logits)) + out.aux_loss, out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, out.logits, out.aux_loss, out.cache, grads


def assert_trees_close(actual, expected, rtol=1e-10, atol=1e-12):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_layer_runs_split_the_pattern_into_runs_of_equal_letters():
    assert layer_runs("MGGGAGGG") == [(0, 1), (1, 4), (4, 5), (5, 8)]
    assert layer_runs("GGGG") == [(0, 4)]
    assert layer_runs("MGSARU") == [(i, i + 1) for i in range(6)]


@pytest.mark.parametrize("pattern, remat", [("MMGGGSSAARRUUM", "none"), ("MMGGAM", "full"), ("MMGGAM", "save_dots")])
def test_scanned_decoder_equals_the_unrolled_one_in_every_mixer(x64, pattern, remat):
    """Runs of 2-3 blocks of every mixer kind and single blocks between them (the remat choices on a shorter
    pattern: rematerialisation wraps a scanned block the same way whatever its mixer): values and every gradient."""
    config = float64_config(pattern).replace(remat=remat)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
    unrolled = loss_and_gradients(config, ids)
    scanned = loss_and_gradients(config.replace(scan_layers=True), ids)
    assert_trees_close(scanned, unrolled)


def test_scanned_moe_blocks_sum_their_aux_losses(x64):
    config = float64_config("MMM", moe=True)
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    unrolled = loss_and_gradients(config, ids)
    scanned = loss_and_gradients(config.replace(scan_layers=True), ids)
    assert float(unrolled[2]) > 0
    assert_trees_close(scanned, unrolled)


def test_scanned_decoder_masks_documents_and_decodes_with_a_cache(x64):
    """segment_ids reach every scanned block (attention, M2RNN); a prefill then one-token steps carry the states."""
    config = float64_config("AAMM")
    ids = jax.random.randint(jax.random.key(3), (2, 8), 0, config.vocab_size)
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2]], jnp.int32)
    assert_trees_close(
        loss_and_gradients(config.replace(scan_layers=True), ids, segments), loss_and_gradients(config, ids, segments)
    )

    @nnx.jit
    def step(model, ids, cache):
        out = model(ids, cache)
        return out.logits, out.cache

    def decode(config):
        model = Decoder(config, rngs=nnx.Rngs(0))
        logits, cache = step(model, ids[:, :5], model.init_cache(2, 8))
        all_logits = [logits]
        for t in range(5, 8):  # one compile for the three one-token steps
            logits, cache = step(model, ids[:, t : t + 1], cache)
            all_logits.append(logits)
        return jnp.concatenate(all_logits, axis=1), cache

    scanned, unrolled = decode(config.replace(scan_layers=True)), decode(config)
    assert_trees_close(scanned, unrolled)
    whole_sequence = step(Decoder(config, rngs=nnx.Rngs(0)), ids, None)[0]
    np.testing.assert_allclose(scanned[0], whole_sequence, rtol=1e-10, atol=1e-12)


def test_scanning_keeps_the_parameter_tree_and_shrinks_the_traced_program():
    config = tiny_config("GGGGGGGG", hidden_size=16)
    unrolled, scanned = Decoder(config, rngs=nnx.Rngs(0)), Decoder(config.replace(scan_layers=True), rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(unrolled, nnx.Param)) == jax.tree.structure(nnx.state(scanned, nnx.Param))
    ids = jnp.zeros((1, 4), jnp.int32)

    def equations(model):
        graphdef, params = nnx.split(model, nnx.Param)
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids).logits)(params)
        return len(jaxpr.jaxpr.eqns) + sum(
            len(eqn.params["jaxpr"].jaxpr.eqns) for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"
        )

    assert equations(scanned) * 3 < equations(unrolled)


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="scan_layers: expected True or False, got 'yes'"):
        tiny_config("MM").replace(scan_layers="yes")
