"""Decoding: token-by-token logits equal the full forward for every mixer type; greedy and sampled generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.generation import (
    decode_step,
    filter_logits,
    generate,
    generate_ragged,
    left_pad_prompts,
    prefill,
    sample_logits,
)
from m2rnn_jax.models.presets import tiny_config

EVERY_MIXER = "MGSARU"


def decode_versus_forward(config, *, batch: int = 2, seq_len: int = 7, prompt_length: int = 3):
    """(full-forward logits, prefill + token-by-token logits), both (B, S, vocab)."""
    model = Decoder(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, config.vocab_size, dtype=jnp.int32)
    full = nnx.jit(lambda m, x: m(x).logits)(model, ids)
    cache = model.init_cache(batch, seq_len)
    logits, cache = nnx.jit(prefill)(model, ids[:, :prompt_length], cache)
    pieces = [logits]
    step = nnx.jit(decode_step)
    for t in range(prompt_length, seq_len):
        step_logits, cache = step(model, ids[:, t], cache)
        pieces.append(step_logits[:, None])
    return np.asarray(full, dtype=np.float64), np.asarray(jnp.concatenate(pieces, axis=1), dtype=np.float64)


def assert_close_and_informative(full: np.ndarray, decoded: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(decoded, full, rtol=0, atol=atol)
    # The comparison can fail: logits depend on the context, not only on the current token.
    assert np.max(np.abs(full[:, 1:] - full[:, :1])) > 100 * atol


@pytest.mark.parametrize("pattern, moe", [(EVERY_MIXER, False), ("MA", True)], ids=["every-mixer", "moe"])
def test_decode_equals_forward_float32(pattern, moe):
    config = tiny_config(pattern, moe=moe).replace(initializer_range=0.1)
    full, decoded = decode_versus_forward(config)
    assert_close_and_informative(full, decoded, atol=1e-4)


def test_decode_equals_forward_float64(x64):
    config = tiny_config(EVERY_MIXER).replace(initializer_range=0.1, dtype="float64", param_dtype="float64")
    full, decoded = decode_versus_forward(config)
    assert_close_and_informative(full, decoded, atol=1e-10)


@pytest.fixture(scope="module")
def tiny_model():
    return Decoder(tiny_config("MAM").replace(initializer_range=0.1), rngs=nnx.Rngs(0))


def test_greedy_generation_is_deterministic_and_matches_teacher_forcing(tiny_model):
    prompt = jnp.asarray([[5, 17, 3], [250, 0, 9]], dtype=jnp.int32)
    tokens = generate(tiny_model, prompt, max_new_tokens=5)
    assert tokens.shape == (2, 8) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens[:, :3], prompt)
    np.testing.assert_array_equal(tokens, generate(tiny_model, prompt, max_new_tokens=5))
    logits = nnx.jit(lambda m, x: m(x).logits)(tiny_model, tokens[:, :-1])
    np.testing.assert_array_equal(jnp.argmax(logits[:, 2:], axis=-1), tokens[:, 3:])


def test_sampled_generation_depends_only_on_the_key(tiny_model):
    prompt = jnp.asarray([[1, 2]], dtype=jnp.int32)
    sample = lambda seed: generate(  # noqa: E731
        tiny_model, prompt, max_new_tokens=6, key=jax.random.key(seed), temperature=1.5, top_k=50, top_p=0.95
    )
    np.testing.assert_array_equal(sample(0), sample(0))
    assert not np.array_equal(sample(0), sample(1))
    top1 = generate(tiny_model, prompt, max_new_tokens=6, key=jax.random.key(2), temperature=2.0, top_k=1)
    np.testing.assert_array_equal(top1, generate(tiny_model, prompt, max_new_tokens=6))


def test_generate_rejects_bad_arguments(tiny_model):
    prompt = jnp.asarray([[1, 2]], dtype=jnp.int32)
    for kwargs, field in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(max_new_tokens=2, top_k=-1), "top_k"),
        (dict(max_new_tokens=2, temperature=1.0), "key"),
    ]:
        with pytest.raises(ValueError, match=field):
            generate(tiny_model, prompt, **kwargs)


PROBS = np.array([[0.05, 0.5, 0.15, 0.3]])
LOGITS = jnp.asarray(np.log(PROBS), dtype=jnp.float32)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [(0, 1.0, {0, 1, 2, 3}), (1, 1.0, {1}), (2, 1.0, {1, 3}), (0, 0.5, {1}), (0, 0.7, {1, 3}),
     (0, 0.81, {1, 2, 3}), (3, 0.99, {1, 2, 3}), (2, 0.9, {1, 3})],
)  # fmt: skip
def test_filter_logits_keeps_the_top_k_and_nucleus_sets(top_k, top_p, kept):
    filtered = np.asarray(filter_logits(LOGITS, top_k, top_p))[0]
    assert set(np.flatnonzero(np.isfinite(filtered))) == kept
    np.testing.assert_allclose(filtered[list(kept)], np.asarray(LOGITS)[0, list(kept)])


def test_samples_stay_inside_the_filtered_set_and_follow_the_probabilities():
    keys = jax.random.split(jax.random.key(0), 4000)
    logits = jnp.broadcast_to(LOGITS, (1, 4))
    draw = jax.vmap(lambda key, k, p: sample_logits(logits, key, 1.0, k, p)[0], in_axes=(0, None, None))
    counts = np.bincount(np.asarray(draw(keys, 0, 1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(counts, PROBS[0], atol=0.03)
    assert set(np.asarray(draw(keys, 2, 1.0)).tolist()) == {1, 3}
    assert set(np.asarray(draw(keys, 0, 0.81)).tolist()) == {1, 2, 3}
    greedy = sample_logits(logits, keys[0], 0.0, 0, 1.0)
    assert int(greedy[0]) == 1


RAGGED_PROMPTS = [[5, 17, 3, 200, 9, 41, 7], [88], [12, 250, 33, 4]]


def test_left_pad_prompts():
    ids, segments = left_pad_prompts([[3, 4, 5], np.array([7]), jnp.array([8, 9])], pad_id=1)
    np.testing.assert_array_equal(ids, [[3, 4, 5], [1, 1, 7], [1, 8, 9]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        left_pad_prompts([])
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty 1-D sequence of integer token ids"):
        left_pad_prompts([[1, 2], []])
    with pytest.raises(ValueError, match=r"prompts\[0\]: expected a non-empty 1-D sequence of integer token ids"):
        left_pad_prompts([[1.5, 2.0]])


@pytest.mark.slow  # ~40 s on 2 cores; test_generate_ragged_greedy_equals_single_prompts covers the default run
def test_ragged_prefill_and_decode_logits_equal_single_prompts():
    """Left-padded prefill + decode steps give each prompt's logits of running it alone (float32)."""
    config = tiny_config(EVERY_MIXER).replace(initializer_range=0.1)
    model = Decoder(config, rngs=nnx.Rngs(0))
    ids, segments = left_pad_prompts(RAGGED_PROMPTS)
    steps = [[3, 60, 7], [11, 2, 99]]  # tokens fed after the prompts, one column per row

    def run(ids, segment_ids, steps):
        cache = model.init_cache(ids.shape[0], ids.shape[1] + len(steps))
        logits, cache = nnx.jit(prefill)(model, jnp.asarray(ids), cache, segment_ids=segment_ids)
        step_logits = []
        for tokens in steps:
            out, cache = nnx.jit(decode_step)(model, jnp.asarray(tokens, jnp.int32), cache)
            step_logits.append(out)
        return np.asarray(logits), [np.asarray(out) for out in step_logits]

    logits, step_logits = run(ids, jnp.asarray(segments), steps)
    for b, prompt in enumerate(RAGGED_PROMPTS):
        alone, alone_steps = run(np.asarray([prompt]), None, [[tokens[b]] for tokens in steps])
        np.testing.assert_allclose(logits[b, ids.shape[1] - len(prompt) :], alone[0], rtol=0, atol=2e-5)
        for got, want in zip(step_logits, alone_steps):
            np.testing.assert_allclose(got[b], want[0], rtol=0, atol=2e-5)
    plain, _ = run(ids, None, [])
    assert np.max(np.abs(plain[1, -1] - logits[1, -1])) > 1e-3  # without segments the padding leaks in


def test_generate_ragged_greedy_equals_single_prompts():
    config = tiny_config(EVERY_MIXER).replace(initializer_range=0.1)
    model = Decoder(config, rngs=nnx.Rngs(0))
    tokens = generate_ragged(model, RAGGED_PROMPTS, max_new_tokens=5)
    assert len(tokens) == len(RAGGED_PROMPTS)
    for prompt, new in zip(RAGGED_PROMPTS, tokens):
        alone = generate(model, jnp.asarray([prompt], jnp.int32), max_new_tokens=5)
        assert new.dtype == np.int32 and new.shape == (5,)
        np.testing.assert_array_equal(new, np.asarray(alone[0, len(prompt) :]))
    # the same max_new_tokens as above: temperature and key are traced, so sampling reuses the greedy compile
    sampled = generate_ragged(model, RAGGED_PROMPTS, max_new_tokens=5, key=jax.random.key(1), temperature=1.0)
    assert [s.shape for s in sampled] == [(5,)] * 3
    with pytest.raises(ValueError, match="key: sampling with temperature > 0 needs a PRNG key"):
        generate_ragged(model, RAGGED_PROMPTS, max_new_tokens=3, temperature=1.0)
