"""The training state pytree (step, fp32 master params, optimizer state, RNG) and its sharded creation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from m2rnn_jax.models import Decoder, ModelConfig
from m2rnn_jax.parallel.shardings import optimizer_state_shardings, parameter_shardings, replicated


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpoints save exactly this).

    step: () int32, optimizer steps taken. params: the decoder's parameters (``param_dtype``, fp32 master copy).
    opt_state: optax state. rng: (2,) uint32 raw PRNG key data, split every step.
    """

    step: jax.Array
    params: nnx.State
    opt_state: Any
    rng: jax.Array


def _split_params(model: Decoder) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model: expected only nnx.Param variables, found others: {rest}")
    return graphdef, params


def model_graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The static structure of the decoder (no parameter memory is allocated)."""
    return _split_params(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))[0]


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(parameter key, step-RNG key) of a run's ``seed``: ``jax.random.key(seed)``, ``jax.random.key(seed + 1)``."""
    return jax.random.key(seed), jax.random.key(seed + 1)


def init_train_state(
    config: ModelConfig, optimizer: optax.GradientTransformation, seed: int | tuple[jax.Array, jax.Array]
) -> TrainState:
    """Fresh state: parameters from ``Decoder(config, rngs=nnx.Rngs(key(seed)))``, step 0 (call under ``jax.jit``).

    ``seed``: an int, or its :func:`seed_keys` (the same state; passed as arguments of a jitted init they make one
    compiled program serve every seed, so a persistent compilation cache hit for the next seed).
    """
    param_key, rng_key = seed_keys(seed) if isinstance(seed, int) else seed
    _, params = _split_params(Decoder(config, rngs=nnx.Rngs(param_key)))
    rng = jax.random.key_data(rng_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def abstract_train_state(config: ModelConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs of :func:`init_train_state` (no memory allocated)."""
    return jax.eval_shape(lambda: init_train_state(config, optimizer, 0))


def train_state_shardings(abstract: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of the state: params by their logical axes, moments like their params."""
    params = parameter_shardings(abstract.params, mesh)
    return TrainState(
        step=replicated(mesh),
        params=params,
        opt_state=optimizer_state_shardings(optimizer, abstract.opt_state, params, mesh),
        rng=replicated(mesh),
    )


def create_train_state(
    config: ModelConfig, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """(state, shardings): a fresh state created directly in its shards (no full copy on one device)."""
    shardings = train_state_shardings(abstract_train_state(config, optimizer), optimizer, mesh)
    with jax.set_mesh(mesh):
        init = jax.jit(lambda keys: init_train_state(config, optimizer, keys), out_shardings=shardings)
        state = init(seed_keys(seed))  # the seed as an argument: one program for every seed
    return state, shardings
