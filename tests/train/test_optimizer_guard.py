"""`skip_if_not_finite` equals `optax.apply_if_finite` exactly: the same state type (checkpoints stay
compatible), updates, moments and counters over a run of steps with finite, NaN and Inf gradients, also after
`max_consecutive_errors` when the update is accepted anyway; and it fuses (no conditional in the jitted update)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2rnn_jax.train.optimizer import skip_if_not_finite


def _inner() -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1, mask={"w": True, "b": False})
    )


def _gradients():
    key = jax.random.key(0)
    for step in range(7):
        key, sub = jax.random.split(key)
        grads = {"w": jax.random.normal(sub, (3, 4)), "b": jnp.arange(4.0) * (step + 1)}
        if step in (2, 4, 5):  # NaN, Inf, NaN: steps 4 and 5 are consecutive
            grads["w"] = grads["w"].at[1, 2].set(jnp.nan if step != 4 else jnp.inf)
        yield grads


def _run(transformation):
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    state = transformation.init(params)
    update = jax.jit(transformation.update)
    history = []
    for grads in _gradients():
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((updates, state, params))
    return history


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_same_as_optax_apply_if_finite():
    for max_errors in (10, 1):  # 1: the second consecutive non-finite update (step 5) is accepted
        ours = _run(skip_if_not_finite(_inner(), max_consecutive_errors=max_errors))
        theirs = _run(optax.apply_if_finite(_inner(), max_consecutive_errors=max_errors))
        for step, (a, b) in enumerate(zip(ours, theirs)):
            assert type(a[1]) is type(b[1]) is optax.ApplyIfFiniteState, step
            _assert_trees_equal(a, b)
    final_state = ours[-1][1]
    assert int(final_state.total_notfinite) == 3 and bool(final_state.last_finite)


def test_skipped_steps_keep_parameters_and_moments():
    history = _run(skip_if_not_finite(_inner(), max_consecutive_errors=10))
    (_, state_1, params_1), (updates_2, state_2, params_2) = history[1], history[2]
    _assert_trees_equal(params_1, params_2)
    _assert_trees_equal(state_1.inner_state, state_2.inner_state)
    assert all(float(jnp.abs(leaf).sum()) == 0.0 for leaf in jax.tree.leaves(updates_2))
    assert int(state_2.notfinite_count) == 1 and not bool(state_2.last_finite)


def test_no_conditional_in_the_update():
    transformation = skip_if_not_finite(_inner(), max_consecutive_errors=10)
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    state = transformation.init(params)
    jaxpr = str(jax.make_jaxpr(transformation.update)(params, state, params))
    assert "cond[" not in jaxpr
    assert "cond[" in str(jax.make_jaxpr(optax.apply_if_finite(_inner(), 10).update)(params, state, params))
