"""Document masking (``segment_ids``): a packed row of documents equals running each document alone from zeros.

For the conv and every mixer: outputs, gradients w.r.t. the input, the final state (recurrent mixers), a
continuation of the returned state (one more token continues the last document), and position 0 continuing a
given state. float64, tight tolerances; the unmasked run differs, so the checks can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers import CausalDepthwiseConv1d
from m2rnn_jax.layers.attention import Attention, AttentionConfig
from m2rnn_jax.layers.documents import document_index, document_starts
from m2rnn_jax.layers.gru import GRU, GRUConfig
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig
from m2rnn_jax.layers.mamba2 import Mamba2, Mamba2Config
from m2rnn_jax.layers.rnn import RNN, RNNConfig
from m2rnn_jax.ops.ssd import ssd_chunked, ssd_recurrent

HIDDEN = 6
# row 0: documents [0, 3) [3, 7) [7, 10); row 1: [0, 8) [8, 10) (ids need not increase)
SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 3, 3]], dtype=np.int32)
TOL = dict(rtol=1e-10, atol=1e-12)

MIXERS = {
    "m2rnn": lambda rngs: M2RNN(
        HIDDEN,
        M2RNNConfig(num_heads=2, k_head_dim=4, v_head_dim=3, backend="scan"),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
    "mamba2_chunk3": lambda rngs: Mamba2(
        HIDDEN,
        Mamba2Config(num_heads=2, intermediate_size=8, state_size=5, chunk_size=3),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
    "mamba2_chunk4_groups": lambda rngs: Mamba2(
        HIDDEN,
        Mamba2Config(num_heads=4, intermediate_size=8, state_size=3, num_groups=2, chunk_size=4),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
    "rnn_no_conv": lambda rngs: RNN(
        HIDDEN,
        RNNConfig(num_heads=2, head_dim=3, kernel_size=None),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
    "gru": lambda rngs: GRU(
        HIDDEN,
        GRUConfig(num_heads=2, head_dim=3, kernel_size=3),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
    "attention": lambda rngs: Attention(
        HIDDEN,
        AttentionConfig(num_heads=2, num_kv_heads=1),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
    "attention_rope": lambda rngs: Attention(
        HIDDEN,
        AttentionConfig(num_heads=3, position_embedding="rope"),
        num_layers=2,
        initializer_range=0.5,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=rngs,
    ),
}


def documents_of_row(b: int) -> list[tuple[int, int]]:
    row = SEGMENTS[b]
    bounds = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
    return list(zip(bounds[:-1], bounds[1:]))


def row_of(state, b: int):
    """The state of batch row b (leaves with a batch axis are sliced, the attention position is shared)."""
    return jax.tree.map(lambda a: a[b : b + 1] if a.ndim else a, state)


def test_document_starts_and_index():
    segments = jnp.asarray(SEGMENTS)
    starts = document_starts(segments, 2, 10)
    np.testing.assert_array_equal(starts[0], [0, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(starts[1], [0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(document_index(segments, 2, 10)[0], [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \(B, S\) = \(2, 9\), got \(2, 10\)"):
        document_starts(segments, 2, 9)
    with pytest.raises(ValueError, match="segment_ids: expected an integer array, got dtype float32"):
        document_starts(segments.astype(jnp.float32), 2, 10)


def _numpy_masked_conv(x, kernel, state, segments):
    """Direct loop: output t sums taps whose input is in t's document (state entries count as document 0)."""
    ks = kernel.shape[0]
    padded = np.concatenate([state, x], axis=1)
    document = np.concatenate(
        [np.zeros((x.shape[0], ks - 1), int), np.asarray(document_index(jnp.asarray(segments), *segments.shape))],
        axis=1,
    )
    y = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(ks):
                if document[b, t + j] == document[b, t + ks - 1]:
                    y[b, t] += kernel[j] * padded[b, t + j]
    return y


def test_conv_taps_stop_at_document_starts(x64):
    conv = CausalDepthwiseConv1d(
        3, 4, activation=None, initializer_range=0.5, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (2, 10, 3), jnp.float64)
    state = jax.random.normal(jax.random.key(2), (2, 3, 3), jnp.float64)
    y, new_state = conv(x, state, segment_ids=jnp.asarray(SEGMENTS))
    expected = _numpy_masked_conv(np.asarray(x), np.asarray(conv.kernel[...]), np.asarray(state), SEGMENTS)
    np.testing.assert_allclose(y, expected, **TOL)
    # the state keeps the last document only: row 0's last document has 3 tokens, row 1's only 2
    np.testing.assert_allclose(new_state[0], x[0, 7:], **TOL)
    np.testing.assert_allclose(new_state[1], np.concatenate([np.zeros((1, 3)), x[1, 8:]]), **TOL)
    # a call shorter than the tail: the state entries before a reset are dropped
    short_y, short_state = conv(x[:, :2], state, segment_ids=jnp.asarray([[0, 1], [0, 0]], jnp.int32))
    np.testing.assert_allclose(short_state[0], np.concatenate([np.zeros((2, 3)), x[0, 1:2]]), **TOL)
    np.testing.assert_allclose(short_state[1], np.concatenate([state[1, 2:], x[1, :2]]), **TOL)
    np.testing.assert_allclose(short_y[0, 1], conv(x[:1, 1:2])[0][0, 0], **TOL)


def _apply(module):
    graphdef, variables = nnx.split(module)

    @jax.jit
    def run(x, state, segment_ids):
        return nnx.merge(graphdef, variables)(x, state, segment_ids=segment_ids)

    @jax.jit
    def input_grad(x, state, segment_ids, cotangent):
        def loss(x):
            y, _ = nnx.merge(graphdef, variables)(x, state, segment_ids=segment_ids)
            return jnp.sum(y * cotangent)

        return jax.grad(loss)(x)

    return run, input_grad


def _prefix_state(run, mixer, key):
    """The state after a random 3-token prefix (a KV cache with room for 3 + 10 + 1 tokens)."""
    prefix = jax.random.normal(key, (2, 3, HIDDEN), jnp.float64)
    return run(prefix, mixer.init_state(2, 14, dtype=jnp.float64), None)[1]


SLOW_VARIANTS = ("mamba2_chunk4_groups", "rnn_no_conv", "attention_rope")  # the default suite has one per mixer


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_VARIANTS else n for n in sorted(MIXERS)]
)
def test_packed_documents_equal_separate_runs(x64, name):
    """The row starts from a given state (a 3-token prefix): its first document continues it, the others start
    from zeros."""
    mixer = MIXERS[name](nnx.Rngs(0))
    run, input_grad = _apply(mixer)
    x = jax.random.normal(jax.random.key(3), (2, 10, HIDDEN), jnp.float64)
    cotangent = jax.random.normal(jax.random.key(4), (2, 10, HIDDEN), jnp.float64)
    x_next = jax.random.normal(jax.random.key(5), (2, 1, HIDDEN), jnp.float64)
    state0 = _prefix_state(run, mixer, jax.random.key(6))
    segments = jnp.asarray(SEGMENTS)

    y, state = run(x, state0, segments)
    grad = input_grad(x, state0, segments, cotangent)
    y_next, _ = run(x_next, state, None)
    y_plain, _ = run(x, state0, None)
    assert float(jnp.max(jnp.abs(y_plain - y))) > 1e-3  # the boundaries matter

    for b in range(2):
        documents = documents_of_row(b)
        for i, (s, e) in enumerate(documents):
            first = i == 0
            doc_state = row_of(state0, b) if first else None
            if doc_state is None and name.startswith("attention"):
                doc_state = mixer.init_state(1, 11, dtype=jnp.float64)
            y_doc, state_doc = run(x[b : b + 1, s:e], doc_state, None)
            np.testing.assert_allclose(y[b, s:e], y_doc[0], **TOL)
            grad_doc = input_grad(x[b : b + 1, s:e], doc_state, None, cotangent[b : b + 1, s:e])
            np.testing.assert_allclose(grad[b, s:e], grad_doc[0], **TOL)
            if i == len(documents) - 1:
                if not name.startswith("attention"):  # the KV cache holds the whole row, not one document
                    for got, want in zip(jax.tree.leaves(row_of(state, b)), jax.tree.leaves(state_doc)):
                        np.testing.assert_allclose(got, want, **TOL)
                y_next_doc, _ = run(x_next[b : b + 1], state_doc, None)
                np.testing.assert_allclose(y_next[b], y_next_doc[0], **TOL)


@pytest.mark.parametrize("name", ["m2rnn", "mamba2_chunk3", "gru", "attention"])
def test_one_document_is_the_default(x64, name):
    """segment_ids with a single id per row changes nothing."""
    mixer = MIXERS[name](nnx.Rngs(1))
    run, _ = _apply(mixer)
    x = jax.random.normal(jax.random.key(7), (2, 10, HIDDEN), jnp.float64)
    y_plain, _ = run(x, None, None)
    y_one, _ = run(x, None, jnp.full((2, 10), 4, jnp.int32))
    np.testing.assert_allclose(y_one, y_plain, **TOL)


@pytest.mark.parametrize("chunk_size", [2, 3, 16])
def test_ssd_chunked_reset_matches_recurrent_reset(x64, chunk_size):
    """The chunked SSD with resets (resets at chunk starts, mid-chunk, adjacent) equals the step-by-step form."""
    keys = jax.random.split(jax.random.key(8), 5)
    b, s, h, p, g, n = 2, 9, 4, 3, 2, 5
    x = jax.random.normal(keys[0], (b, s, h, p), jnp.float64)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (b, s, h), jnp.float64))
    log_decay = -dt * jnp.linspace(0.5, 2.0, h)
    B = jax.random.normal(keys[2], (b, s, g, n), jnp.float64)
    C = jax.random.normal(keys[3], (b, s, g, n), jnp.float64)
    h0 = jax.random.normal(keys[4], (b, h, p, n), jnp.float64)
    reset = jnp.zeros((b, s), bool).at[0, jnp.array([2, 3, 7])].set(True).at[1, 0].set(True).at[1, 5].set(True)
    y_ref, final_ref = ssd_recurrent(x, dt, log_decay, B, C, h0, reset)
    y, final = ssd_chunked(x, dt, log_decay, B, C, h0, chunk_size, reset)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(final, final_ref, **TOL)
    y_plain, _ = ssd_recurrent(x, dt, log_decay, B, C, h0)
    assert float(jnp.max(jnp.abs(y_plain - y_ref))) > 1e-3
