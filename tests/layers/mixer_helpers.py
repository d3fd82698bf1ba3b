"""Checks shared by the sequence-mixer tests: abstract parameter counts and decode == forward."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def count_params(factory: Callable[[], nnx.Module]) -> int:
    """Number of parameter elements of ``factory()``, built abstractly with ``nnx.eval_shape`` (no allocation)."""
    abstract = nnx.eval_shape(factory)
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return sum(int(np.prod(leaf.shape)) for leaf in leaves)


def jitted(mixer: nnx.Module) -> Callable:
    """``(x, state=None, **kwargs) -> mixer(x, state, **kwargs)`` under ``jax.jit`` (one compile per shape)."""
    graphdef, variables = nnx.split(mixer)

    @jax.jit
    def apply(variables, x, state, kwargs):
        return nnx.merge(graphdef, variables)(x, state, **kwargs)

    return lambda x, state=None, **kwargs: apply(variables, x, state, kwargs)


def run_token_by_token(mixer: nnx.Module, x: jax.Array, state, *, prefill: int = 0):
    """Run ``prefill`` tokens at once, then the rest of x (B, S, h) one token at a time, carrying the state.

    Returns (y (B, S, h), final state).
    """
    apply = jitted(mixer)
    outputs = []
    if prefill:
        y, state = apply(x[:, :prefill], state)
        outputs.append(y)
    for t in range(prefill, x.shape[1]):
        y, state = apply(x[:, t : t + 1], state)
        outputs.append(y)
    return jnp.concatenate(outputs, axis=1), state


def assert_decode_matches_forward(mixer: nnx.Module, x: jax.Array, *, rtol: float, atol: float, prefill: int = 2):
    """Full forward from ``init_state`` == prefill + token-by-token decoding: outputs and every state leaf."""
    batch, seq_len, _ = x.shape
    dtype = jnp.promote_types(jnp.float32, x.dtype)
    y_full, state_full = jitted(mixer)(x, mixer.init_state(batch, seq_len, dtype=dtype))
    y_steps, state_steps = run_token_by_token(mixer, x, mixer.init_state(batch, seq_len, dtype=dtype), prefill=prefill)
    np.testing.assert_allclose(np.asarray(y_steps), np.asarray(y_full), rtol=rtol, atol=atol)
    for leaf_steps, leaf_full in zip(jax.tree.leaves(state_steps), jax.tree.leaves(state_full), strict=True):
        np.testing.assert_allclose(np.asarray(leaf_steps), np.asarray(leaf_full), rtol=rtol, atol=atol)
