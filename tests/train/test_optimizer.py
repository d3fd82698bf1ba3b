"""Optimizer: warmup + cosine schedule, weight-decay mask of SPEC §0.4, NaN/Inf guard."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m2rnn_jax.models import Decoder, tiny_config
from m2rnn_jax.train.config import OptimizerConfig
from m2rnn_jax.train.optimizer import build_optimizer, learning_rate_schedule, skipped_updates, weight_decay_mask


def test_schedule_warms_up_from_zero_then_decays_to_the_floor():
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    schedule = learning_rate_schedule(config, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half way down
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-6)


def test_weight_decay_mask_follows_spec_0_4():
    model = nnx.eval_shape(lambda: Decoder(tiny_config("MA", vocab_size=32), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = weight_decay_mask(params, OptimizerConfig().no_decay_names)
    flat = {"/".join(map(str, path)): bool(variable.get_value()) for path, variable in nnx.to_flat_state(mask)}
    decayed = {name for name, decay in flat.items() if decay}
    assert decayed == {name for name in flat if name.rsplit("/", 1)[-1] in ("kernel", "embedding", "state_weight")}
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
