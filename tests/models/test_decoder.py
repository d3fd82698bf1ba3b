"""The decoder: shapes, init, MoE aux loss, document masking, remat, loss functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.loss import cross_entropy, next_token_targets
from m2rnn_jax.models.presets import tiny_config


def random_ids(seed: int, shape: tuple[int, ...], vocab_size: int = 256) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab_size, dtype=jnp.int32)


@nnx.jit
def forward_logits(model: Decoder, ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return model(ids, segment_ids=segment_ids).logits


def test_forward_shapes_and_dtypes_in_bfloat16():
    config = tiny_config("MA").replace(dtype="bfloat16")
    model = Decoder(config, rngs=nnx.Rngs(0))
    output = nnx.jit(lambda m, x: m(x))(model, random_ids(1, (2, 5)))
    assert output.logits.shape == (2, 5, config.vocab_size)
    assert output.logits.dtype == jnp.bfloat16
    assert model.embed.embedding[...].dtype == jnp.float32
    assert len(output.cache) == config.num_layers
    assert output.aux_loss.shape == () and float(output.aux_loss) == 0.0


def test_embedding_and_head_init_follow_initializer_range():
    config = tiny_config("M", vocab_size=512, hidden_size=128).replace(initializer_range=0.05)
    model = Decoder(config, rngs=nnx.Rngs(0))
    for weights in (model.embed.embedding[...], model.lm_head.kernel[...]):
        assert float(jnp.std(weights)) == pytest.approx(0.05, rel=0.05)
        assert abs(float(jnp.mean(weights))) < 0.005
    assert model.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


def test_tied_embeddings_use_the_embedding_as_head():
    model = Decoder(tiny_config("M").replace(tie_embeddings=True), rngs=nnx.Rngs(0))
    assert model.lm_head is None
    ids = random_ids(2, (1, 4))
    logits = forward_logits(model, ids)
    hidden = nnx.jit(lambda m, x: m.final_norm(m.blocks[0](m.embed(x))[0]))(model, ids)
    np.testing.assert_allclose(logits, hidden @ model.embed.embedding[...].T, rtol=1e-5, atol=1e-6)


def test_moe_aux_loss_is_collected_from_every_block():
    model = Decoder(tiny_config("MM", moe=True), rngs=nnx.Rngs(0))
    ids = random_ids(3, (2, 6))

    @nnx.jit
    def total_and_per_block(model: Decoder, ids: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        x, per_block = model.embed(ids), []
        for block in model.blocks:
            x, _, aux = block(x)
            per_block.append(aux)
        return model(ids).aux_loss, per_block

    total, per_block = total_and_per_block(model, ids)
    assert all(float(aux) > 0 for aux in per_block)
    assert float(total) == pytest.approx(sum(float(aux) for aux in per_block), rel=1e-5)


def test_segment_ids_mask_attention_across_documents():
    model = Decoder(tiny_config("AA"), rngs=nnx.Rngs(0))
    ids = random_ids(4, (1, 8))
    changed = ids.at[0, :3].set((ids[0, :3] + 7) % 256)
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=jnp.int32)
    masked = forward_logits(model, ids, segments)
    masked_changed = forward_logits(model, changed, segments)
    np.testing.assert_allclose(masked[0, 3:], masked_changed[0, 3:], rtol=1e-5, atol=1e-6)
    unmasked = forward_logits(model, ids)
    unmasked_changed = forward_logits(model, changed)
    assert float(jnp.max(jnp.abs(unmasked[0, 3:] - unmasked_changed[0, 3:]))) > 1e-4


def test_packed_documents_equal_separate_runs_in_every_mixer(x64):
    """A row of three documents with segment_ids gives each document's logits of a separate run (float64)."""
    config = tiny_config("MGSARU", hidden_size=32).replace(
        initializer_range=0.1, dtype="float64", param_dtype="float64"
    )
    model = Decoder(config, rngs=nnx.Rngs(0))
    ids = random_ids(7, (1, 11))
    bounds = [0, 5, 6, 11]  # documents of 5, 1 and 5 tokens: the two of length 5 share one compile
    segments = jnp.asarray([[0] * 5 + [1] + [2] * 5], dtype=jnp.int32)
    packed = forward_logits(model, ids, segments)
    for s, e in zip(bounds[:-1], bounds[1:]):
        np.testing.assert_allclose(packed[0, s:e], forward_logits(model, ids[:, s:e])[0], rtol=1e-9, atol=1e-10)
    assert float(jnp.max(jnp.abs(forward_logits(model, ids)[0, 5:] - packed[0, 5:]))) > 1e-4


def test_bad_inputs_raise():
    model = Decoder(tiny_config("M"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids"):
        model(random_ids(6, (5,)))
    with pytest.raises(ValueError, match="cache"):
        model(random_ids(6, (1, 5)), cache=())
    with pytest.raises(ValueError, match="segment_ids"):
        model(random_ids(6, (1, 5)), segment_ids=jnp.zeros((1, 4), dtype=jnp.int32))


def test_cross_entropy_matches_numpy_with_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 3))
    mask = np.array([[1, 0, 1], [1, 1, 0]])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / mask.sum()
    value, count = cross_entropy(jnp.asarray(logits, dtype=jnp.bfloat16).astype(jnp.float32), targets, mask)
    value_f32, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert int(count) == 4
    np.testing.assert_allclose(value_f32, expected, rtol=1e-6)
    np.testing.assert_allclose(value, expected, rtol=2e-2)


def test_next_token_targets_shift():
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    mask = jnp.ones((2, 5), dtype=jnp.int32).at[:, 2].set(0)
    segments = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]], dtype=jnp.int32)
    inputs, targets, target_mask, input_segments = next_token_targets(tokens, mask, segments)
    np.testing.assert_array_equal(inputs, tokens[:, :-1])
    np.testing.assert_array_equal(targets, tokens[:, 1:])
    np.testing.assert_array_equal(target_mask, mask[:, 1:])
    np.testing.assert_array_equal(input_segments, segments[:, :-1])
    with pytest.raises(ValueError, match="tokens"):
        next_token_targets(tokens[:, :1])
