"""Optimizer: warmup + cosine schedule, weight-decay mask of SPEC §0.4, NaN/Inf guard, the fused update vs optax's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m2rnn_jax.models import Decoder, tiny_config
from m2rnn_jax.testing import jaxpr_equations
from m2rnn_jax.train.config import OptimizerConfig
from m2rnn_jax.train.optimizer import (
    build_optimizer,
    global_norm,
    learning_rate_schedule,
    reference_optimizer,
    skipped_updates,
    weight_decay_mask,
)


def test_schedule_warms_up_from_zero_then_decays_to_the_floor():
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    schedule = learning_rate_schedule(config, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half way down
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-6)


@pytest.mark.parametrize("warmup_steps", [0, 10])
def test_schedule_with_decay_steps_holds_the_peak_then_anneals(warmup_steps):
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=warmup_steps, min_lr_ratio=0.1, decay_steps=40)
    schedule = learning_rate_schedule(config, total_steps=110)
    for step in (max(warmup_steps, 1), 40, 70):
        np.testing.assert_allclose(float(schedule(step)), 1e-3, rtol=1e-6)  # stable until 110 - 40
    np.testing.assert_allclose(float(schedule(90)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half way down
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-6)
    whole = OptimizerConfig(learning_rate=1e-3, warmup_steps=warmup_steps, decay_steps=110 - warmup_steps)
    default = OptimizerConfig(learning_rate=1e-3, warmup_steps=warmup_steps)
    for step in (0, 5, 30, 77, 110):  # a decay over everything after the warmup is the default schedule
        assert float(learning_rate_schedule(whole, 110)(step)) == float(learning_rate_schedule(default, 110)(step))


def test_decay_steps_must_fit_after_the_warmup():
    with pytest.raises(ValueError, match="optimizer.decay_steps"):
        OptimizerConfig(decay_steps=0)
    with pytest.raises(ValueError, match=r"optimizer.decay_steps: expected at most steps - warmup_steps = 100"):
        learning_rate_schedule(OptimizerConfig(warmup_steps=10, decay_steps=101), total_steps=110)


def test_weight_decay_mask_follows_spec_0_4():
    model = nnx.eval_shape(lambda: Decoder(tiny_config("MARU", vocab_size=32), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = weight_decay_mask(params, OptimizerConfig().no_decay_names)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flat = {"/".join(map(str, path)): bool(variable.get_value()) for path, variable in nnx.to_flat_state(mask)}
    decayed = {name for name, decay in flat.items() if decay}
    rnn_state_weights = {"blocks/2/mixer/state_weight", "blocks/3/mixer/state_weight"}  # SPEC §9.5: RNN, GRU
    assert rnn_state_weights <= set(flat)
    assert (
        decayed
        == {name for name in flat if name.rsplit("/", 1)[-1] in ("kernel", "embedding", "state_weight")}
        - rnn_state_weights
    )
    for name in (
        "blocks/0/mixer/state_weight",
        "blocks/0/mixer/conv1d/kernel",
        "embed/embedding",
        "lm_head/kernel",
        "blocks/0/mixer/input_projection/kernel",
    ):
        assert flat[name], name
    for name in (
        "blocks/0/mixer/D",
        "blocks/0/mixer/decay_gate/A_log",
        "blocks/0/mixer/decay_gate/dt_bias",
        "blocks/0/norm1/scale",
        "blocks/0/mixer/g_norm/scale",
        "final_norm/scale",
    ):
        assert not flat[name], name


def test_non_finite_gradients_skip_the_update_and_are_counted():
    optimizer = build_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0), total_steps=10)
    params = {"w": jnp.ones((3,), jnp.float32)}
    state = optimizer.init(params)
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0], jnp.float32)}
    updates, state = optimizer.update(bad, state, params)
    assert np.all(np.asarray(optax.apply_updates(params, updates)["w"]) == 1.0)
    assert int(skipped_updates(state)) == 1
    good = {"w": jnp.ones((3,), jnp.float32)}
    updates, state = optimizer.update(good, state, params)
    assert np.all(np.asarray(optax.apply_updates(params, updates)["w"]) < 1.0)
    assert int(skipped_updates(state)) == 1


def _random_gradients(key: jax.Array, params, scale: float):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


@pytest.mark.parametrize(
    "config",
    [
        OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
        OptimizerConfig(learning_rate=1e-2, warmup_steps=0, grad_clip_norm=None),
        OptimizerConfig(learning_rate=1e-2, warmup_steps=3, weight_decay=0.0, b2=0.999, eps=1e-8),
    ],
    ids=["default", "no_clip", "no_decay"],
)
def test_fused_adamw_equals_the_optax_composition_step_for_step(config):
    """Parameters, moments, counts and skip counters of :func:`build_optimizer` (fused) and
    :func:`reference_optimizer` (optax) agree after every step of a run with clipped and unclipped gradients, a NaN
    step and an Inf step, on a decoder's parameter tree (decayed and undecayed leaves)."""
    model = Decoder(tiny_config("MA", vocab_size=32), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    total_steps = 8
    scales = [10.0, 1e-3, float("nan"), 0.3, float("inf"), 5.0, 1e-2]
    runs = {}
    for name, build in (("fused", build_optimizer), ("optax", reference_optimizer)):
        optimizer = build(config, total_steps)

        @jax.jit
        def step(p, state, grads, optimizer=optimizer):
            updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        p, state, history = params, optimizer.init(params), []
        for i, scale in enumerate(scales):
            grads = _random_gradients(jax.random.key(i), params, 1.0 if not np.isfinite(scale) else scale)
            if not np.isfinite(scale):  # one bad entry in one leaf
                leaves, treedef = jax.tree.flatten(grads)
                leaves[1] = leaves[1].at[(0,) * leaves[1].ndim].set(scale)
                grads = jax.tree.unflatten(treedef, leaves)
            p, state = step(p, state, grads)
            history.append((p, state))
        runs[name] = history
    assert jax.tree.structure(runs["fused"][-1]) == jax.tree.structure(runs["optax"][-1])
    for i, (fused, reference) in enumerate(zip(runs["fused"], runs["optax"])):
        for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(reference)):
            a, b = np.asarray(a), np.asarray(b)  # float32 rounding: XLA contracts the fused products differently
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.max(np.abs(b)), err_msg=f"step {i}")
    assert int(skipped_updates(runs["fused"][-1][1])) == 2


def test_fused_adamw_needs_the_parameters():
    optimizer = build_optimizer(OptimizerConfig(), total_steps=10)
    params = {"w": jnp.ones((3,), jnp.float32)}
    with pytest.raises(ValueError, match="params: expected the parameters"):
        optimizer.update(params, optimizer.init(params))


def test_global_norm_is_optax_tree_norm_bitwise():
    tree = {"a": jnp.linspace(-3.0, 5.0, 17), "b": {"c": jnp.full((4, 3), 0.1), "d": jnp.arange(6.0).reshape(2, 3)}}
    assert np.asarray(jax.jit(global_norm)(tree)) == np.asarray(jax.jit(optax.tree.norm)(tree))
    assert float(global_norm({})) == float(optax.tree.norm({})) == 0.0


def test_fused_adamw_traces_one_update_per_distinct_parameter_shape():
    """Parameters alike (shape, dtype, weight decay) share one traced update (the trace of a 7B step's optimizer)."""
    params = {f"w{i}": jnp.ones((4, 8), jnp.float32) for i in range(6)} | {"norm": {"scale": jnp.ones((8,))}}
    optimizer = build_optimizer(OptimizerConfig(), total_steps=10)
    jaxpr = jax.make_jaxpr(lambda g, s, p: optimizer.update(g, s, p))(params, optimizer.init(params), params)
    calls = jaxpr_equations(jaxpr.jaxpr, "jit") + jaxpr_equations(jaxpr.jaxpr, "pjit")
    updates = [e for e in calls if e.params["name"] == "_adamw_leaf"]
    assert len(updates) == 7
    assert len({id(e.params["jaxpr"]) for e in updates}) == 2  # the six (4, 8) kernels, and the (8,) scale
