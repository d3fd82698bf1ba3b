"""The LM head's logits GEMM with softmax statistics in the epilogue (pallas_kernels/gpu/logits_softmax_tiles.py)
against jnp on the full logits.

Interpret mode on any platform: ragged rows, depth and vocabulary (masked tiles), float64 and bfloat16, ties across
and within tiles (the first index wins), the statistics alone, bad inputs. Marked ``gpu``: the compiled kernel at
one chunk of the 400M presets' head (bf16, h = 1024, V = 100352) and a ragged float32 shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.testing import relative_error
from pallas_kernels.gpu.logits_softmax_tiles import (
    LogitsTilesConfig,
    combine_tiles,
    default_config,
    logits_softmax_tiles,
)

SMALL = LogitsTilesConfig(block_rows=16, block_v=32, block_k=16, num_warps=4, num_stages=2)


def inputs(rows: int, depth: int, vocab: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(keys[0], (rows, depth), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(keys[1], (depth, vocab), jnp.float32) * 2 / np.sqrt(depth)).astype(dtype)
    reference = jax.random.normal(keys[2], (rows,), jnp.float32).astype(jnp.promote_types(jnp.float32, dtype))
    return hidden, kernel, reference


def expected_statistics(hidden, kernel, reference):
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.promote_types(jnp.float32, hidden.dtype))
    return (
        logits,
        jnp.max(logits, 1),
        jnp.argmax(logits, 1),
        jax.nn.logsumexp(logits, 1),
        jnp.exp(logits - reference[:, None]),
    )


@pytest.mark.parametrize("rows,depth,vocab", [(37, 40, 301), (32, 32, 128), (5, 16, 33)])
def test_float64_statistics_and_exp_logits_equal_jnp(x64, rows, depth, vocab):
    hidden, kernel, reference = inputs(rows, depth, vocab, jnp.float64)
    tiles = logits_softmax_tiles(hidden, kernel, reference, config=SMALL, interpret=True)
    _, row_max, argmax, logsumexp, exp_logits = expected_statistics(hidden, kernel, reference)
    assert tiles.tile_max.shape == tiles.tile_sumexp.shape == tiles.tile_argmax.shape == (-(-vocab // 32), rows)
    stats = combine_tiles(tiles)
    np.testing.assert_allclose(stats.max, row_max, rtol=1e-13)
    np.testing.assert_array_equal(stats.argmax, argmax)
    np.testing.assert_allclose(stats.logsumexp, logsumexp, rtol=1e-13)
    assert tiles.exp_logits.dtype == jnp.float64
    np.testing.assert_allclose(tiles.exp_logits, exp_logits, rtol=1e-12)


def test_bfloat16_inputs_accumulate_in_float32_and_write_bfloat16():
    hidden, kernel, reference = inputs(48, 64, 200, jnp.bfloat16, seed=1)
    tiles = logits_softmax_tiles(hidden, kernel, reference, config=SMALL, interpret=True)
    _, row_max, argmax, logsumexp, exp_logits = expected_statistics(hidden, kernel, reference)
    assert tiles.tile_max.dtype == tiles.tile_sumexp.dtype == jnp.float32 and tiles.exp_logits.dtype == jnp.bfloat16
    stats = combine_tiles(tiles)
    np.testing.assert_allclose(stats.logsumexp, logsumexp, rtol=1e-5)
    np.testing.assert_array_equal(stats.argmax, argmax)
    assert relative_error(tiles.exp_logits.astype(jnp.float32), exp_logits) < 4e-3  # bf16 rounding of the output


def test_ties_within_and_across_tiles_give_the_first_index(x64):
    """Columns 3 (tile 0), 5 (tile 0) and 70 (tile 2) are copies: the maximum is at 3 for the rows where it is
    maximal, whichever tile holds the copies."""
    hidden, kernel, reference = inputs(20, 16, 100, jnp.float64, seed=2)
    kernel = kernel.at[:, 3].set(10 * jnp.abs(kernel[:, 0]))
    hidden = jnp.abs(hidden)  # every row's maximum is column 3 and its copies
    kernel = kernel.at[:, 5].set(kernel[:, 3]).at[:, 70].set(kernel[:, 3])
    stats = combine_tiles(logits_softmax_tiles(hidden, kernel, reference, config=SMALL, interpret=True))
    np.testing.assert_array_equal(stats.argmax, 3)
    copies = logits_softmax_tiles(hidden, kernel.at[:, 3].set(0), reference, config=SMALL, interpret=True)
    np.testing.assert_array_equal(combine_tiles(copies).argmax, 5)
    across = logits_softmax_tiles(
        hidden, kernel.at[:, 3].set(0).at[:, 5].set(0), reference, config=SMALL, interpret=True
    )
    np.testing.assert_array_equal(combine_tiles(across).argmax, 70)


def test_statistics_alone_write_no_exp_logits(x64):
    hidden, kernel, reference = inputs(9, 16, 40, jnp.float64, seed=3)
    tiles = logits_softmax_tiles(hidden, kernel, reference, with_exp=False, config=SMALL, interpret=True)
    assert tiles.exp_logits is None
    np.testing.assert_allclose(combine_tiles(tiles).logsumexp, expected_statistics(hidden, kernel, reference)[3])


def test_default_config_fits_small_dimensions_and_parse_reads_the_five_numbers():
    assert default_config(2048, 1024, 100352) == LogitsTilesConfig(128, 128, 64, 4, 3)
    assert default_config(5, 24, 33) == LogitsTilesConfig(16, 64, 32, 4, 3)
    assert LogitsTilesConfig.parse("64x256x32x4x4") == LogitsTilesConfig(64, 256, 32, 4, 4)
    with pytest.raises(ValueError, match="config: expected ROWSxCOLSxDEPTHxWARPSxSTAGES"):
        LogitsTilesConfig.parse("64x256")
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16"):
        LogitsTilesConfig(block_k=8)


def test_bad_inputs_raise():
    hidden, kernel, reference = inputs(4, 16, 20, jnp.float32)
    with pytest.raises(ValueError, match="hidden: expected shape"):
        logits_softmax_tiles(hidden[0], kernel, reference, interpret=True)
    with pytest.raises(ValueError, match=r"kernel: expected shape \(16, V\)"):
        logits_softmax_tiles(hidden, kernel.T, reference, interpret=True)
    with pytest.raises(ValueError, match="kernel: expected the float dtype of hidden"):
        logits_softmax_tiles(hidden, kernel.astype(jnp.bfloat16), reference, interpret=True)
    with pytest.raises(ValueError, match=r"reference: expected shape \(4,\)"):
        logits_softmax_tiles(hidden, kernel, reference[:3], interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows,depth,vocab,dtype,tolerance",
    [(2048, 1024, 100352, jnp.bfloat16, 4e-3), (300, 72, 5000, jnp.float32, 1e-5)],
    ids=["head_chunk_bf16", "ragged_f32"],
)
def test_compiled_matches_jnp_on_gpu(rows, depth, vocab, dtype, tolerance):
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    hidden, kernel, reference = inputs(rows, depth, vocab, dtype, seed=4)
    tiles = jax.jit(logits_softmax_tiles)(hidden, kernel, reference)
    with jax.default_matmul_precision("highest"):
        _, row_max, argmax, logsumexp, exp_logits = expected_statistics(hidden, kernel, reference)
    stats = combine_tiles(tiles)
    np.testing.assert_allclose(stats.logsumexp, logsumexp, rtol=1e-5)
    assert float(jnp.mean(stats.argmax == argmax)) > 0.999  # near-ties may differ by summation order
    assert relative_error(tiles.exp_logits.astype(jnp.float32), exp_logits) < tolerance
