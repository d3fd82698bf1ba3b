"""``ModelConfig.scan_layers``: runs of equal mixer letters, and periods of runs repeated back to back, as
``lax.scan`` loops give the unrolled decoder's results.

The plan of segments of the paper's patterns and of small ones, exactly. Float64 equality (values, aux loss,
per-block states and every parameter gradient) for every mixer kind, every remat choice, MoE blocks, document
masking and decoding with a cache, on patterns of runs and of periods; the traced program of a long run is a
fraction of the unrolled one's (the point of the option) and a repeated period is one loop; the parameter tree is
unchanged. The 8-device check
(tests/parallel/eight_device_checks.py, ``scanned_steps``) trains a scanned model on data/fsdp/tensor meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.layer_scan import Segment, layer_plan, layer_runs
from m2rnn_jax.models.presets import get_preset, tiny_config


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


@pytest.mark.parametrize(
    "pattern, plan",
    [
        ("M", [Segment(0, (1,))]),
        ("GGGG", [Segment(0, (4,))]),
        ("MGSARU", [Segment(i, (1,)) for i in range(6)]),
        ("GAGAGA", [Segment(0, (1, 1), 3)]),
        ("AGGAGG", [Segment(0, (1, 2), 2)]),
        ("GAGAG", [Segment(0, (1, 1), 2), Segment(4, (1,))]),
        # of periods covering as many layers (GA x 4, GAGA x 2), the one of fewest runs
        ("GAGAGAGA", [Segment(0, (1, 1), 4)]),
        # the period covering the most layers wins over a shorter one starting at the same run (GA x 2)
        ("GAGAMGAGAM", [Segment(0, (1, 1, 1, 1, 1), 2)]),
        # no period starts at the first run: G, then AGG x 3
        ("GAGGAGGAGG", [Segment(0, (1,)), Segment(1, (1, 2), 3)]),
        ("MGGAGGAGGA", [Segment(0, (1,)), Segment(1, (2, 1), 3)]),
        # a run of 4 is not a repetition of the period's run of 2
        ("AGGAGGAGGGG", [Segment(0, (1, 2), 2), Segment(6, (1,)), Segment(7, (4,))]),
    ],
)
def test_layer_plan_splits_small_patterns_into_runs_and_periods(pattern, plan):
    assert layer_plan(pattern) == plan
    assert [segment.stop for segment in plan] == [segment.start for segment in plan[1:]] + [len(pattern)]


def test_layer_plan_of_the_paper_hybrids_repeats_the_attention_period():
    """400M: M, GGG, AGGGGGGG x 2, A, GGG; 7B: M, GGG, AGGGGGGG x 4, A, GGG (5 segments instead of 8 and 12 runs)."""
    pattern_400m = get_preset("hybrid-gdn-m2rnn-1l-400m").layer_pattern
    pattern_7b = get_preset("hybrid-gdn-m2rnn-1l-7b").layer_pattern
    assert pattern_400m == "MGGGAGGGGGGGAGGGGGGGAGGG"
    assert pattern_7b == "MGGGA" + "GGGGGGGA" * 4 + "GGG"
    assert layer_plan(pattern_400m) == [
        Segment(0, (1,)),
        Segment(1, (3,)),
        Segment(4, (1, 7), 2),
        Segment(20, (1,)),
        Segment(21, (3,)),
    ]
    assert layer_plan(pattern_7b) == [
        Segment(0, (1,)),
        Segment(1, (3,)),
        Segment(4, (1, 7), 4),
        Segment(36, (1,)),
        Segment(37, (3,)),
    ]


@pytest.mark.parametrize(
    "pattern, remat",
    [
        ("MMGGGSSAARRUUM", "none"),
        ("MMGGAM", "full"),
        ("MMGGAM", "save_dots"),
        ("MGGAGGAGGA", "none"),  # M, then GGA x 3: an inner scan and a single block in the period's body
        ("MGGAGGAGGA", "full"),
    ],
)
def test_scanned_decoder_equals_the_unrolled_one_in_every_mixer(x64, pattern, remat):
    """Runs of 2-3 blocks of every mixer kind and single blocks between them (the remat choices on a shorter
    pattern: rematerialisation wraps a scanned block the same way whatever its mixer), and a period of runs:
    values and every gradient (a period applied in another order, or its states or gradients given to other
    layers, would differ)."""
    config = float64_config(pattern).replace(remat=remat)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
    unrolled = loss_and_gradients(config, ids)
    scanned = loss_and_gradients(config.replace(scan_layers=True), ids)
    assert_trees_close(scanned, unrolled)


@pytest.mark.parametrize("pattern", ["MMM", "GAGAGA"])
def test_scanned_moe_blocks_sum_their_aux_losses(x64, pattern):
    """A run of MoE blocks, and a period of single MoE blocks repeated 3 times."""
    config = float64_config(pattern, moe=True)
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    unrolled = loss_and_gradients(config, ids)
    scanned = loss_and_gradients(config.replace(scan_layers=True), ids)
    assert float(unrolled[2]) > 0
    assert_trees_close(scanned, unrolled)


@pytest.mark.parametrize("pattern", ["AAMM", "AMMAMM"])
def test_scanned_decoder_masks_documents_and_decodes_with_a_cache(x64, pattern):
    """segment_ids reach every scanned block (attention, M2RNN); a prefill then one-token steps carry the states
    (runs, and the period AMM x 2 whose states are stacked over repetitions and over its run of two)."""
    config = float64_config(pattern)
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


def test_a_repeated_period_is_one_loop_around_its_runs():
    """AGG x 4: one scan over the repetitions at the top of the program, whose body holds one scan (the GG run)
    over a stack built inside the body."""
    config = tiny_config("AGG" * 4, hidden_size=16).replace(scan_layers=True)
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids).logits)(params).jaxpr

    def scans(jaxpr):
        return [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]

    (outer,) = scans(jaxpr)
    assert outer.params["length"] == 4
    (inner,) = scans(outer.params["jaxpr"].jaxpr)
    assert inner.params["length"] == 2
    # The GG run's parameters enter the outer loop as one (4, ...) stack per place, never as a (4, 2, ...) stack:
    # every layer of such a stack would be read back through a slice of its own offset (a distinct kernel each).
    loop_inputs = outer.invars[outer.params["num_consts"] + outer.params["num_carry"] :]
    shapes = [tuple(var.aval.shape) for var in loop_inputs]
    run_leaf_shapes = {leaf.shape for leaf in jax.tree.leaves(params["blocks"][1])}  # block 1: a G of the GG run
    for shape in run_leaf_shapes:
        assert (4, 2) + shape not in shapes, shape
        assert shapes.count((4,) + shape) >= 2, shape  # one stack per place of the run (both G blocks)


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="scan_layers: expected True or False, got 'yes'"):
        tiny_config("MM").replace(scan_layers="yes")
