"""Causal softmax attention vs a per-token float64 NumPy reference; masking, GQA, RoPE, KV-cache decoding.

``jax.nn.dot_product_attention`` always runs its softmax in float32, so float64 checks of the layer hold to
~1e-7 relative, not 1e-12 (the projections and RoPE alone are checked tighter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers.attention import Attention, AttentionConfig
from m2rnn_jax.layers.rope import apply_rope
from tests.layers.mixer_helpers import assert_decode_matches_forward, count_params, jitted


def make_attention(hidden, config, *, dtype=jnp.float32, key=0):
    return Attention(
        hidden, config, num_layers=2, initializer_range=0.3, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key)
    )


def numpy_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate each pair (x[i], x[i + d/2]) of x (S, d) by the angle positions * theta**(-2i/d), one 2x2 at a time."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for s, position in enumerate(positions):
        for i in range(half):
            angle = position * theta ** (-2.0 * i / x.shape[-1])
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            out[s, i], out[s, i + half] = rotation @ np.array([x[s, i], x[s, i + half]])
    return out


def numpy_attention(module: Attention, x: np.ndarray, segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Direct per-query-token causal attention of the layer in float64."""
    c = module.config
    d, group = module.head_dim, module.group_size
    batch, seq_len, _ = x.shape
    qkv = (x @ np.asarray(module.c_attn.kernel[...])).reshape(batch, seq_len, c.num_kv_heads, group + 2, d)
    out = np.zeros((batch, seq_len, c.num_heads, d))
    positions = np.arange(seq_len)
    for b in range(batch):
        for n in range(c.num_heads):
            kv_head = n // group
            q, k, v = qkv[b, :, kv_head, n % group], qkv[b, :, kv_head, group], qkv[b, :, kv_head, group + 1]
            if c.position_embedding == "rope":
                q, k = numpy_rope(q, positions, c.rope_theta), numpy_rope(k, positions, c.rope_theta)
            for t in range(seq_len):
                visible = [s for s in range(t + 1) if segment_ids is None or segment_ids[b, s] == segment_ids[b, t]]
                logits = np.array([q[t] @ k[s] for s in visible]) / np.sqrt(d)
                weights = np.exp(logits - logits.max())
                out[b, t, n] = (weights / weights.sum()) @ v[visible]
    return out.reshape(batch, seq_len, -1) @ np.asarray(module.c_proj.kernel[...])


@pytest.mark.parametrize("position_embedding", ["nope", "rope"])
def test_attention_matches_numpy_float64(x64, position_embedding):
    config = AttentionConfig(num_heads=4, num_kv_heads=2, position_embedding=position_embedding)
    module = make_attention(16, config, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 6, 16), jnp.float64)
    y, state = jitted(module)(x)
    np.testing.assert_allclose(y, numpy_attention(module, np.asarray(x)), rtol=1e-6, atol=1e-7)
    assert state.key.shape == (2, 6, 2, 4) and int(state.position) == 6


def test_document_masking_matches_numpy_and_separate_documents(x64):
    module = make_attention(16, AttentionConfig(num_heads=2, position_embedding="rope"), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (2, 7, 16), jnp.float64)
    segment_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 2, 2]], dtype=jnp.int32)
    apply = jitted(module)
    y, _ = apply(x, segment_ids=segment_ids)
    expected = numpy_attention(module, np.asarray(x), np.asarray(segment_ids))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    first, _ = apply(x[:1, :3])
    second, _ = apply(x[:1, 3:])  # RoPE is relative: restarting positions does not change the output
    np.testing.assert_allclose(y[:1], jnp.concatenate([first, second], axis=1), rtol=1e-6, atol=1e-7)


def test_future_tokens_do_not_change_the_past():
    module = make_attention(16, AttentionConfig(num_heads=4, num_kv_heads=1))
    x = jax.random.normal(jax.random.key(3), (2, 8, 16), jnp.float32)
    changed = x.at[:, 5:].set(jax.random.normal(jax.random.key(4), (2, 3, 16), jnp.float32))
    apply = jitted(module)
    y, _ = apply(x)
    y_changed, _ = apply(changed)
    np.testing.assert_array_equal(y[:, :5], y_changed[:, :5])
    assert not np.allclose(y[:, 5:], y_changed[:, 5:])


def test_gqa_equals_mha_with_each_kv_head_repeated_over_its_group():
    hidden, d, group = 16, 4, 2
    gqa = make_attention(hidden, AttentionConfig(num_heads=4, num_kv_heads=2, position_embedding="rope"))
    mha = make_attention(hidden, AttentionConfig(num_heads=4, position_embedding="rope"))
    blocks = gqa.c_attn.kernel[...].reshape(hidden, 2, group + 2, d)  # per KV head [q0 | q1 | k | v]
    mha_blocks = []
    for kv in range(2):
        for g in range(group):  # MHA head n = kv * group + g gets its own copy of k, v
            mha_blocks.append(jnp.stack([blocks[:, kv, g], blocks[:, kv, group], blocks[:, kv, group + 1]], axis=1))
    mha.c_attn.kernel[...] = jnp.stack(mha_blocks, axis=1).reshape(hidden, -1)
    mha.c_proj.kernel[...] = gqa.c_proj.kernel[...]
    x = jax.random.normal(jax.random.key(5), (2, 5, hidden), jnp.float32)
    np.testing.assert_allclose(jitted(gqa)(x)[0], jitted(mha)(x)[0], rtol=1e-5, atol=1e-6)


def test_rope_matches_numpy_rotation(x64):
    x = jax.random.normal(jax.random.key(6), (2, 5, 3, 8), jnp.float64)
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], dtype=jnp.int32)
    rotated = np.asarray(apply_rope(x, positions, 500.0))
    for b in range(2):
        for n in range(3):
            expected = numpy_rope(np.asarray(x[b, :, n]), np.asarray(positions[b]), 500.0)
            np.testing.assert_allclose(rotated[b, :, n], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-7), (jnp.float32, 2e-5)])
def test_decode_matches_forward(x64, dtype, tol):
    config = AttentionConfig(num_heads=4, num_kv_heads=2, position_embedding="rope")
    module = make_attention(16, config, dtype=dtype)
    x = jax.random.normal(jax.random.key(7), (2, 6, 16), dtype)
    assert_decode_matches_forward(module, x, rtol=tol, atol=tol, prefill=2)
    apply = jitted(module)
    y_no_cache, _ = apply(x)
    y_cache, _ = apply(x, module.init_state(2, 9, dtype=dtype))  # a larger cache than needed changes nothing
    np.testing.assert_allclose(y_cache, y_no_cache, rtol=tol, atol=tol)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="position_embedding"):
        AttentionConfig(num_heads=4, position_embedding="alibi")
    module = make_attention(16, AttentionConfig(num_heads=4))
    x = jnp.ones((1, 5, 16), jnp.float32)
    with pytest.raises(ValueError, match="max_length"):
        module(x, module.init_state(1, 4))
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \(B, S\) = \(1, 5\), got \(1, 4\)"):
        module(x, module.init_state(1, 8), segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="state.documents: expected shape"):
        module(x, module.init_state(1, 8)._replace(documents=jnp.zeros((1, 7), jnp.int32)))
    with pytest.raises(ValueError, match="hidden_size"):
        make_attention(18, AttentionConfig(num_heads=4))


def test_parameter_count_at_400m():
    count = count_params(lambda: Attention(1024, AttentionConfig(num_heads=16), num_layers=24, rngs=nnx.Rngs(0)))
    assert count == 1024 * 3 * 1024 + 1024 * 1024  # 4.19M (SPEC §10.2)
