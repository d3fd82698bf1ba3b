"""Constant-memory decoding: ``prefill`` + ``decode_step`` with per-block caches, greedy and sampled generation.

Recurrent mixers (M2RNN, GDN, Mamba2, RNN, GRU) carry a fixed-size state (conv tail + recurrent state), so their
memory does not grow with the generated length; attention carries a KV buffer allocated once for ``max_length``
tokens. :func:`generate` runs prefill and the whole decode loop inside one ``jax.jit`` (a ``lax.scan`` over the
new tokens); temperature, top-k and top-p are traced values, so changing them does not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.models.decoder import Cache, Decoder


def prefill(
    model: Decoder, input_ids: jax.Array, cache: Cache, *, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, Cache]:
    """Runs a prompt through the model from ``cache``.

    Args:
        model: the decoder.
        input_ids: (B, P) prompt token ids.
        cache: from ``model.init_cache(B, max_length)`` (or a previous call).
        segment_ids: optional (B, P) document ids (see :meth:`Decoder.__call__`); :func:`left_pad_prompts` makes
            them for left-padded prompts.

    Returns:
        (logits (B, P, vocab) in float32 (float64 for float64 models), the cache after the prompt).
    """
    output = model(input_ids, cache, segment_ids=segment_ids)
    return output.logits.astype(jnp.promote_types(jnp.float32, output.logits.dtype)), output.cache


def decode_step(model: Decoder, token_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Feeds one token per sequence.

    Args:
        model: the decoder.
        token_ids: (B,) the newest token of each sequence.
        cache: the cache after all previous tokens.

    Returns:
        (logits (B, vocab) in float32 (float64 for float64 models) for the next token, the updated cache).
    """
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids: expected shape (B,), got {token_ids.shape}")
    logits, cache = prefill(model, token_ids[:, None], cache)
    return logits[:, 0], cache


def filter_logits(logits: jax.Array, top_k: jax.Array | int = 0, top_p: jax.Array | float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to ``-inf``.

    Args:
        logits: (B, vocab) float.
        top_k: keep the k largest logits of each row; 0 keeps all. Ties with the k-th value are kept.
        top_p: then keep the smallest set of largest-probability tokens whose probability (after top-k) reaches
            ``top_p``; 1.0 keeps all. The most likely token is always kept.

    Returns:
        (B, vocab) float32 logits with the removed entries at ``-inf``.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    top_k = jnp.asarray(top_k, dtype=jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_largest = jnp.take(descending, k - 1, axis=-1)[:, None]
    ranks = jnp.arange(vocab, dtype=jnp.int32)
    descending = jnp.where(ranks < k, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = (mass_before < jnp.asarray(top_p, dtype=jnp.float32)) | (ranks == 0)
    smallest_kept = jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth_largest, smallest_kept)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float = 0.0,
    top_k: jax.Array | int = 0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """Picks one token per row: argmax when ``temperature == 0``, else a sample of softmax(logits / temperature)
    restricted by :func:`filter_logits`.

    Args:
        logits: (B, vocab).
        key: PRNG key.
        temperature: >= 0.
        top_k, top_p: see :func:`filter_logits`.

    Returns:
        (B,) int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, dtype=jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    segment_ids: jax.Array | None,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    batch_size, prompt_length = prompt_ids.shape
    cache = model.init_cache(batch_size, prompt_length + max_new_tokens)
    logits, cache = prefill(model, prompt_ids, cache, segment_ids=segment_ids)
    keys = jax.random.split(key, max_new_tokens)
    first_token = sample_logits(logits[:, -1], keys[0], temperature, top_k, top_p)

    def step(carry: tuple[jax.Array, Cache], step_key: jax.Array) -> tuple[tuple[jax.Array, Cache], jax.Array]:
        token, cache = carry
        next_logits, cache = decode_step(model, token, cache)
        return (sample_logits(next_logits, step_key, temperature, top_k, top_p), cache), token

    (last_token, _), tokens = jax.lax.scan(step, (first_token, cache), keys[1:])
    return jnp.concatenate([tokens.T, last_token[:, None]], axis=1)


def _check_sampling(
    max_new_tokens: int, key: jax.Array | None, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Validates the sampling arguments; returns the key to use (a fixed one for greedy decoding)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: expected >= 0 (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    if key is None:
        if temperature > 0:
            raise ValueError("key: sampling with temperature > 0 needs a PRNG key, got None")
        key = jax.random.key(0)
    return key


def _run_generate(
    model: Decoder,
    prompt_ids: jax.Array,
    segment_ids: jax.Array | None,
    key: jax.Array,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
) -> jax.Array:
    """The new tokens (B, max_new_tokens) int32 of :func:`_generate` for validated arguments."""
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_ids,
        segment_ids,
        key,
        jnp.asarray(temperature, dtype=jnp.float32),
        jnp.asarray(top_k, dtype=jnp.int32),
        jnp.asarray(top_p, dtype=jnp.float32),
        max_new_tokens=max_new_tokens,
    )


def generate(
    model: Decoder,
    prompt_ids: jax.Array,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens (greedy by default), all under one ``jax.jit``.

    Args:
        model: the decoder.
        prompt_ids: (B, P) int prompt token ids, P >= 1 (all prompts of the same length).
        max_new_tokens: number of tokens to append (>= 1); the attention KV buffers hold P + max_new_tokens.
        key: PRNG key for sampling (needed when temperature > 0).
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: sample among the k most likely tokens (0 = all).
        top_p: nucleus sampling threshold in (0, 1] (1 = all).

    Returns:
        (B, P + max_new_tokens) int32: the prompts followed by the generated tokens.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids: expected shape (B, P) with P >= 1, got {prompt_ids.shape}")
    key = _check_sampling(max_new_tokens, key, temperature, top_k, top_p)
    new_tokens = _run_generate(model, prompt_ids, None, key, temperature, top_k, top_p, max_new_tokens)
    return jnp.concatenate([jnp.asarray(prompt_ids, dtype=jnp.int32), new_tokens], axis=1)


def left_pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packs prompts of different lengths into one left-padded batch.

    Args:
        prompts: B non-empty 1-D sequences of token ids (lists, NumPy or JAX arrays).
        pad_id: the token id written into the padding (its value does not matter: the padding is its own document).

    Returns:
        (ids (B, P) int32, segment_ids (B, P) int32) with P the longest prompt length; row b holds prompt b at its
        end, segment id 0 on the padding and 1 on the prompt.
    """
    if len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of 1-D token sequences, got an empty one")
    rows = [np.asarray(prompt) for prompt in prompts]
    for b, row in enumerate(rows):
        if row.ndim != 1 or row.shape[0] < 1 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"prompts[{b}]: expected a non-empty 1-D sequence of integer token ids, got shape {row.shape} "
                f"dtype {row.dtype}"
            )
    length = max(row.shape[0] for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    segment_ids = np.zeros((len(rows), length), dtype=np.int32)
    for b, row in enumerate(rows):
        ids[b, length - row.shape[0] :] = row
        segment_ids[b, length - row.shape[0] :] = 1
    return ids, segment_ids


def generate_ragged(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[np.ndarray]:
    """Continues prompts of different lengths in one batch, under one ``jax.jit`` like :func:`generate`.

    The prompts are left-padded (:func:`left_pad_prompts`) and the padding is its own document: recurrent mixers
    start each prompt from a zero state and conv tail, attention never attends to padding. Greedy decoding gives
    each prompt exactly the tokens of :func:`generate` on that prompt alone (logits agree to rounding; with RoPE
    the positions are shifted by the padding, which leaves the attention scores equal up to rounding). Sampling
    draws one key per step for the whole batch, so sampled tokens differ from runs of single prompts.

    Args:
        model: the decoder.
        prompts: B non-empty 1-D sequences of token ids.
        max_new_tokens: number of tokens to generate per prompt (>= 1).
        key, temperature, top_k, top_p: as in :func:`generate`.

    Returns:
        B int32 arrays (max_new_tokens,): the new tokens of each prompt (without the prompt).
    """
    ids, segment_ids = left_pad_prompts(prompts)
    key = _check_sampling(max_new_tokens, key, temperature, top_k, top_p)
    new_tokens = _run_generate(
        model, jnp.asarray(ids), jnp.asarray(segment_ids), key, temperature, top_k, top_p, max_new_tokens
    )
    return list(np.asarray(new_tokens))
