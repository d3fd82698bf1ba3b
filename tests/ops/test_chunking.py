"""The chunking shared by the chunked gated delta rule and SSD, against explicit loops."""

from __future__ import annotations

import numpy as np
import pytest

from m2rnn_jax.ops.chunking import chunk_decays, merge_chunks, split_chunks


@pytest.mark.parametrize("seq_len,chunk_size", [(7, 3), (6, 3), (1, 4)])
def test_split_and_merge(seq_len, chunk_size):
    x = np.arange(2 * seq_len * 5, dtype=np.float32).reshape(2, seq_len, 5)
    chunks = np.asarray(split_chunks(x, chunk_size))
    num_chunks = -(-seq_len // chunk_size)
    assert chunks.shape == (2, num_chunks, chunk_size, 5)
    for c in range(num_chunks):
        for i in range(chunk_size):
            t = c * chunk_size + i
            np.testing.assert_array_equal(chunks[:, c, i], x[:, t] if t < seq_len else 0)
    np.testing.assert_array_equal(np.asarray(merge_chunks(chunks, seq_len)), x)


def _expected(log_decay: np.ndarray, reset: np.ndarray) -> tuple[np.ndarray, ...]:
    """The weights of one chunk by their definition: a product of decays over steps with no reset in between."""
    size = log_decay.shape[-1]
    decay = np.zeros((size, size))
    for t in range(size):
        for i in range(t + 1):
            if not reset[i + 1 : t + 1].any():
                decay[t, i] = np.exp(log_decay[i + 1 : t + 1].sum())
    start = np.array([np.exp(log_decay[: t + 1].sum()) if not reset[: t + 1].any() else 0.0 for t in range(size)])
    end = np.array([np.exp(log_decay[i + 1 :].sum()) if not reset[i + 1 :].any() else 0.0 for i in range(size)])
    carry = np.exp(log_decay.sum()) if not reset.any() else 0.0
    return decay, start, end, carry


@pytest.mark.parametrize("with_reset", [False, True])
def test_chunk_decays_match_their_definition(with_reset):
    rng = np.random.default_rng(0)
    log_decay = rng.uniform(-1, 0, (3, 6))  # 3 chunks of 6 steps
    reset = rng.uniform(size=(3, 6)) < 0.3 if with_reset else np.zeros((3, 6), bool)
    if with_reset:
        reset[1, 0] = True  # a reset on the first step of a chunk
    got = chunk_decays(log_decay, reset if with_reset else None)
    for c in range(3):
        for name, a, b in zip(("decay", "start", "end", "carry"), got, _expected(log_decay[c], reset[c])):
            np.testing.assert_allclose(np.asarray(a)[c], b, rtol=1e-6, atol=1e-7, err_msg=f"{name} chunk {c}")
