"""Text in, text out: prompts encoded with a tokenizer, continued in one batch, decoded up to the first EOS.

A prompt is encoded as ``[EOS] + tokenizer.encode(text)``: prepared training data has an EOS token after every
document, so a document always starts right after one, and the model sees a prompt the way it saw document starts.
``tokenizer`` is anything with ``encode``, ``decode``, ``eos_token_id`` and ``vocab_size``
(:class:`m2rnn_jax.data.tokenizer.Tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.generation import generate_ragged


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``[EOS] + encode(text)`` for each text."""
    return [[tokenizer.eos_token_id] + list(tokenizer.encode(text)) for text in texts]


def until_eos(new_tokens: np.ndarray, eos_token_id: int, vocab_size: int) -> list[int]:
    """The new tokens (1-D) before the first EOS, without ids the tokenizer does not know (a padded model vocab)."""
    kept = []
    for token in np.asarray(new_tokens).tolist():
        if token == eos_token_id:
            break
        if token < vocab_size:
            kept.append(token)
    return kept


def continue_text(
    model: Decoder,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    key: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[str]:
    """Each text followed by its continuation (decoded; stops at EOS), all prompts generated in one batch."""
    prompts = encode_prompts(tokenizer, texts)
    vocab_size = model.config.vocab_size
    too_large = [number for number, prompt in enumerate(prompts, 1) if max(prompt) >= vocab_size]
    if too_large:
        raise ValueError(
            f"prompt: expected token ids below model.vocab_size={vocab_size} (tokenizer vocabulary "
            f"{tokenizer.vocab_size}), got larger ones in prompt(s) {too_large}"
        )
    continuations = generate_ragged(
        model, prompts, max_new_tokens=max_new_tokens, key=key, temperature=temperature, top_k=top_k, top_p=top_p
    )
    return [
        tokenizer.decode(prompt[1:] + until_eos(new, tokenizer.eos_token_id, tokenizer.vocab_size))
        for prompt, new in zip(prompts, continuations)
    ]
