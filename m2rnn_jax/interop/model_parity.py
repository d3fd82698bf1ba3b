"""Whole-model parity: the Flax :class:`~m2rnn_jax.models.Decoder` against the independent torch twin.

:func:`compare_model_with_torch` copies the decoder's weights into :class:`DecoderTorch` (through the lm-engine
config translation and name map, so those are checked too) and compares logits, loss, the decode path and the
gradient of every parameter by lm-engine name.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.interop.conversion import _errors, randomize_layer_params
from m2rnn_jax.interop.lm_engine_config import to_lm_engine_config
from m2rnn_jax.interop.names import lm_engine_tensors
from m2rnn_jax.interop.torch_decoder import DecoderTorch, cross_entropy_loss
from m2rnn_jax.interop.torch_reference import torch
from m2rnn_jax.models import Decoder

__all__ = ["torch_decoder_from_flax", "randomize_model_params", "compare_model_with_torch"]

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_decoder_from_flax(model: Decoder) -> DecoderTorch:
    """A :class:`DecoderTorch` with the config and weights of ``model`` (float32 or float64 models)."""
    dtype_name = model.config.param_dtype
    if dtype_name not in _TORCH_DTYPES or model.config.dtype != dtype_name:
        raise ValueError(
            f"model: expected dtype == param_dtype in {sorted(_TORCH_DTYPES)}, "
            f"got dtype={model.config.dtype}, param_dtype={dtype_name}"
        )
    twin = DecoderTorch(to_lm_engine_config(model.config), dtype=_TORCH_DTYPES[dtype_name])
    params = nnx.state(model, nnx.Param)
    state_dict = {name: torch.from_numpy(np.array(array)) for name, array in lm_engine_tensors(params)}
    twin.load_state_dict(state_dict, strict=True)
    return twin


def randomize_model_params(model: Decoder, seed: int, scale: float = 0.3) -> Decoder:
    """Perturb every parameter of ``model`` in place (see :func:`~m2rnn_jax.interop.randomize_layer_params`)."""
    return randomize_layer_params(model, seed, scale)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    log_probabilities = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probabilities, targets[..., None], axis=-1))


@partial(jax.jit, static_argnums=0)
def _forward_and_grads(graphdef, params, input_ids, targets):
    def loss_fn(p):
        output = nnx.merge(graphdef, p)(input_ids)
        cross_entropy = _cross_entropy(output.logits, targets)
        return cross_entropy + output.aux_loss.astype(cross_entropy.dtype), (output, cross_entropy)

    (loss, (output, cross_entropy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return output.logits, output.aux_loss, cross_entropy, loss, grads


@partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, params, input_ids, cache):
    output = nnx.merge(graphdef, params)(input_ids, cache)
    return output.logits, output.cache


def _jax_decode(graphdef, params, model: Decoder, input_ids: jax.Array, prefill: int) -> jax.Array:
    """Logits (B, S - prefill, vocab) of the tokens after ``prefill``, fed one at a time through the cache."""
    batch, seq_len = input_ids.shape
    cache = model.init_cache(batch, seq_len)
    _, cache = _decode_step(graphdef, params, input_ids[:, :prefill], cache)
    steps = []
    for t in range(prefill, seq_len):
        logits, cache = _decode_step(graphdef, params, input_ids[:, t : t + 1], cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


def _torch_decode(twin: DecoderTorch, input_ids: torch.Tensor, prefill: int) -> torch.Tensor:
    with torch.no_grad():
        _, cache, _ = twin(input_ids[:, :prefill])
        steps = []
        for t in range(prefill, input_ids.shape[1]):
            logits, cache, _ = twin(input_ids[:, t : t + 1], cache)
            steps.append(logits)
    return torch.cat(steps, dim=1)


def compare_model_with_torch(model: Decoder, input_ids: Any, targets: Any, prefill: int | None = None) -> dict:
    """Differences between ``model`` and its torch twin on input_ids (B, S) with next-token targets (B, S).

    Returns ``{name: {"abs", "rel"}}`` for ``logits``, ``cross_entropy`` (mean next-token cross-entropy),
    ``aux_loss`` (the MoE aux loss), ``loss`` (cross-entropy + aux),
    ``decode`` (logits of tokens ``prefill..S-1`` fed one at a time after a cached prefill of ``prefill`` tokens;
    default S // 2) and ``grad/<lm-engine name>`` for every parameter.
    """
    input_ids, targets = np.asarray(input_ids), np.asarray(targets)
    if input_ids.ndim != 2 or targets.shape != input_ids.shape:
        raise ValueError(f"input_ids, targets: expected equal (B, S) shapes, got {input_ids.shape}, {targets.shape}")
    seq_len = input_ids.shape[1]
    prefill = seq_len // 2 if prefill is None else prefill
    if not 0 < prefill < seq_len:
        raise ValueError(f"prefill: expected 0 < prefill < S={seq_len}, got {prefill}")
    twin = torch_decoder_from_flax(model)
    graphdef, params = nnx.split(model, nnx.Param)
    logits, aux, cross_entropy, loss, grads = _forward_and_grads(
        graphdef, params, jnp.asarray(input_ids), jnp.asarray(targets)
    )
    decode = _jax_decode(graphdef, params, model, jnp.asarray(input_ids), prefill)

    ids_t = torch.from_numpy(input_ids.astype(np.int64))
    logits_t, _, aux_t = twin(ids_t)
    cross_entropy_t = cross_entropy_loss(logits_t, torch.from_numpy(targets.astype(np.int64)))
    loss_t = cross_entropy_t + aux_t
    loss_t.backward()
    errors = {
        "logits": _errors(logits, logits_t),
        "cross_entropy": _errors(cross_entropy, cross_entropy_t),
        "aux_loss": _errors(aux, aux_t),
        "loss": _errors(loss, loss_t),
        "decode": _errors(decode, _torch_decode(twin, ids_t, prefill)),
    }
    torch_params = dict(twin.named_parameters())
    for name, grad in lm_engine_tensors(grads):
        errors[f"grad/{name}"] = _errors(grad, torch_params[name].grad)
    return errors
