"""Parameter and state sizes of a model, read off the abstract (``nnx.eval_shape``) instance, never a formula.

Building the abstract model allocates no parameter memory, so this works for the 7B presets on a laptop.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.mlp import MoEConfig
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.mixers import mixer_spec

# Top-level Decoder attributes whose parameters are the (input or output) embeddings.
EMBEDDING_MODULES: tuple[str, ...] = ("embed", "lm_head")
# Logical axis name that marks the routed-expert axis of MoE parameters.
EXPERT_AXIS = "expert"


class ParameterCounts(NamedTuple):
    """Parameter counts (elements).

    Attributes:
        total: every parameter.
        non_embedding: ``total`` minus the input embedding and the LM head.
        active: parameters used per token (routed experts count ``top_k / num_experts`` of their size).
        active_non_embedding: ``active`` minus the embeddings.
    """

    total: int
    non_embedding: int
    active: int
    active_non_embedding: int


class StateSizes(NamedTuple):
    """Per-layer decoding state (elements per sequence), keyed by mixer name (``m2rnn``, ``gated_deltanet``, ...).

    Attributes:
        recurrent: recurrent state of each recurrent mixer type (the state the paper compares, SPEC §11.6).
        conv: conv tail (last kernel_size - 1 raw inputs) of each mixer type that has one.
        kv_per_token: attention KV-cache elements per cached token.
    """

    recurrent: dict[str, int]
    conv: dict[str, int]
    kv_per_token: dict[str, int]


def abstract_decoder(config: ModelConfig) -> Decoder:
    """The decoder with ``jax.ShapeDtypeStruct`` parameters (no memory allocated)."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))


def _axis_names(variable: Any) -> tuple[Any, ...]:
    return tuple(variable.get_metadata().get("out_sharding") or ())


def _size(variable: Any) -> int:
    return math.prod(variable.shape)


def count_parameters(model: Decoder) -> ParameterCounts:
    """Counts the parameters of a (concrete or abstract) decoder."""
    config = model.config
    active_fraction = 1.0
    if isinstance(config.mlp, MoEConfig):
        active_fraction = config.mlp.top_k / config.mlp.num_experts
    total = embedding = active = 0.0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = _size(variable)
        total += size
        if path[0] in EMBEDDING_MODULES:
            embedding += size
        active += size * active_fraction if EXPERT_AXIS in _axis_names(variable) else size
    return ParameterCounts(
        total=int(total),
        non_embedding=int(total - embedding),
        active=round(active),
        active_non_embedding=round(active - embedding),
    )


def mixer_parameter_counts(model: Decoder) -> dict[str, int]:
    """Parameters of one sequence mixer of each type in the model (norms and channel mixer excluded)."""
    counts: dict[str, int] = {}
    for block in model.blocks:
        name = mixer_spec(block.letter).field
        if name not in counts:
            state = nnx.state(block.mixer, nnx.Param)
            counts[name] = sum(_size(variable) for _, variable in nnx.to_flat_state(state))
    return counts


def _state_elements(state: Any) -> dict[str, int]:
    """Floating-point elements of each field of a mixer state (integer counters are not state)."""
    fields = state._asdict() if hasattr(state, "_asdict") else {"state": state}
    elements = {}
    for name, value in fields.items():
        leaves = [leaf for leaf in jax.tree.leaves(value) if jnp.issubdtype(leaf.dtype, jnp.floating)]
        elements[name] = sum(math.prod(leaf.shape) for leaf in leaves)
    return elements


def state_sizes(model: Decoder) -> StateSizes:
    """Decoding-state sizes per layer and mixer type, from the abstract ``init_state`` of each mixer type."""
    recurrent: dict[str, int] = {}
    conv: dict[str, int] = {}
    kv_per_token: dict[str, int] = {}
    for block in model.blocks:
        spec = mixer_spec(block.letter)
        name = spec.field
        if name in recurrent or name in kv_per_token:
            continue
        state = jax.eval_shape(lambda mixer=block.mixer: mixer.init_state(1, 1, dtype=jnp.float32))
        elements = _state_elements(state)
        conv_elements = sum(size for field, size in elements.items() if field.startswith("conv"))
        other_elements = sum(size for field, size in elements.items() if not field.startswith("conv"))
        if conv_elements:
            conv[name] = conv_elements
        if spec.kv_cache:
            kv_per_token[name] = other_elements
        else:
            recurrent[name] = other_elements
    return StateSizes(recurrent=recurrent, conv=conv, kv_per_token=kv_per_token)


def model_summary(config: ModelConfig) -> dict[str, Any]:
    """A JSON-ready description of the model built from ``config`` (what ``m2rnn-jax info --json`` prints)."""
    model = abstract_decoder(config)
    counts = count_parameters(model)
    states = state_sizes(model)
    return {
        "layer_pattern": config.layer_pattern,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "channel_mixer": "moe" if isinstance(config.mlp, MoEConfig) else "swiglu",
        "params_total": counts.total,
        "params_non_embedding": counts.non_embedding,
        "params_active": counts.active,
        "params_active_non_embedding": counts.active_non_embedding,
        "params_per_mixer_layer": mixer_parameter_counts(model),
        "recurrent_state_per_layer": states.recurrent,
        "conv_state_per_layer": states.conv,
        "kv_cache_per_token_per_layer": states.kv_per_token,
        "recurrent_state_total": sum(
            states.recurrent.get(mixer_spec(letter).field, 0) for letter in config.layer_pattern
        ),
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
    }
