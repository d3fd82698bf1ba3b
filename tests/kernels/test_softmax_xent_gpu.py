"""The fused softmax cross-entropy kernel (pallas_kernels/gpu/softmax_xent.py) and the chunked LM-head loss with
``statistics="pallas_gpu"``.

On CPU the kernel runs in Pallas interpret mode against jnp (logsumexp, nll, first argmax, d_logits) and the whole
chunked loss against the plain full-logits loss, forward and every gradient; tests marked ``gpu`` run the compiled
kernel on an NVIDIA GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.models.lm_head_loss import lm_head_cross_entropy
from pallas_kernels.gpu.softmax_xent import (
    SoftmaxXentConfig,
    default_config,
    default_one_read_config,
    softmax_cross_entropy,
)
from tests.models.test_lm_head_loss import head_inputs, plain_mean_loss


def hard_logits(seed: int, rows: int, vocab: int, scale: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Logits with ties (inside one vocabulary block and across blocks), large magnitudes, targets at 0 and V - 1,
    and weights 0 on some rows: (logits (R, V) float32, targets (R,) int32, weights (R,) float32)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * scale
    logits[0, [3, vocab - 2]] = logits[0].max() + 1.0  # tie across blocks: the first index wins
    logits[1, [5, 6]] = logits[1].max() + 1.0  # tie inside a block
    logits[2] = 1e4 * np.sign(logits[2])  # large magnitudes, many ties at +1e4
    logits[3, -1] = logits[3].max() + 2.0  # the maximum in the last, partial block
    logits[4] = -3e3 + logits[4]  # all large and negative
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[[0, 3]] = [0, vocab - 1]
    targets[1] = 5  # a hit on a tie
    weights = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    weights[[1, rows - 1]] = 0.0
    return jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)


def jnp_statistics(logits, targets, weights):
    """The reference: (logsumexp, nll, first argmax, d_logits) in float32."""
    logsumexp = jax.nn.logsumexp(logits, axis=-1)
    nll = logsumexp - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    d_logits = (jnp.exp(logits - logsumexp[:, None]) - onehot) * weights[:, None]
    return logsumexp, nll, jnp.argmax(logits, axis=-1).astype(jnp.int32), d_logits


@pytest.mark.parametrize(
    "rows, vocab, block_rows, block_v",
    [(13, 300, 4, 64), (8, 256, 8, 256), (5, 1000, 8, 128), (17, 70, 16, 128)],
    ids=["ragged_both", "exact_blocks", "rows_below_block", "vocab_below_block"],
)
def test_kernel_matches_jnp_in_interpret_mode(rows, vocab, block_rows, block_v):
    logits, targets, weights = hard_logits(rows + vocab, rows, vocab, scale=5.0)
    config = SoftmaxXentConfig(block_rows=block_rows, block_v=block_v, num_warps=4, num_stages=1)
    out = softmax_cross_entropy(logits, targets, weights, config=config, interpret=True)
    logsumexp, nll, argmax, d_logits = jnp_statistics(logits, targets, weights)
    np.testing.assert_allclose(out.logsumexp, logsumexp, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.nll, nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.argmax, argmax)
    assert out.d_logits.dtype == jnp.float32
    np.testing.assert_allclose(out.d_logits, d_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.d_logits[1], 0.0)  # weight 0
    assert int(out.argmax[0]) == 3 and int(out.argmax[1]) == 5  # the first of the tied maxima

    only = softmax_cross_entropy(logits, targets, weights, with_gradient=False, config=config, interpret=True)
    assert only.d_logits is None
    for got, full in zip(only[:3], out[:3]):
        np.testing.assert_array_equal(got, full)


def reference_logits(logits, targets, offset: float = 0.3):
    """A per-row reference near each row's target logit (as the LM head's gather-dot gives it: not exactly the
    logit read), on logits without hard_logits' +-1e4 and -3e3 rows (exp(logits - c) overflows there)."""
    logits = logits.at[2].set(logits[5]).at[4].set(logits[6])
    return logits, jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] + offset


def unscaled_reference(logits, targets, reference):
    """D = exp(logits - c) - exp(logsumexp - c) onehot(target), in float32 (what the one-read kernel writes)."""
    logsumexp = jax.nn.logsumexp(logits, axis=-1)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    return jnp.exp(logits - reference[:, None]) - jnp.exp(logsumexp - reference)[:, None] * onehot


@pytest.mark.parametrize(
    "rows, vocab, block_rows, block_v",
    [(13, 300, 4, 64), (8, 256, 8, 256), (17, 70, 16, 128), (6, 512, 1, 128)],
    ids=["ragged_both", "exact_blocks", "vocab_below_block", "one_row_programs"],
)
def test_one_read_kernel_matches_the_two_pass_kernel(rows, vocab, block_rows, block_v):
    """With a reference c the kernel reads the logits once and writes D = exp(logits - c) - exp(logsumexp - c)
    onehot(target) instead of d_logits; its statistics are the two-pass kernel's, first argmax on ties included, and
    a D with a = w exp(c - logsumexp) is that kernel's d_logits."""
    logits, targets, weights = hard_logits(rows * vocab, rows, vocab, scale=5.0)
    logits, reference = reference_logits(logits, targets)
    config = SoftmaxXentConfig(block_rows=block_rows, block_v=block_v, num_warps=4, num_stages=1)
    out = softmax_cross_entropy(logits, targets, weights, reference=reference, config=config, interpret=True)
    assert out.d_logits is None and out.unscaled_d_logits.dtype == jnp.float32
    np.testing.assert_allclose(out.unscaled_d_logits, unscaled_reference(logits, targets, reference), rtol=1e-5)
    plain = softmax_cross_entropy(logits, targets, weights, config=config, interpret=True)
    for name in ("logsumexp", "nll", "max"):
        np.testing.assert_allclose(getattr(out, name), getattr(plain, name), rtol=1e-6, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(out.argmax, plain.argmax)
    assert int(out.argmax[0]) == 3 and int(out.argmax[1]) == 5  # the first of the tied maxima
    scale = weights * jnp.exp(reference - out.logsumexp)
    np.testing.assert_allclose(scale[:, None] * out.unscaled_d_logits, plain.d_logits, rtol=1e-5, atol=1e-6)
    stats_only = softmax_cross_entropy(
        logits, targets, weights, with_gradient=False, reference=reference, config=config, interpret=True
    )
    assert stats_only.d_logits is None and stats_only.unscaled_d_logits is None
    np.testing.assert_array_equal(stats_only.logsumexp, plain.logsumexp)  # no gradient: the two-pass kernel


def test_one_read_kernel_reads_bfloat16_logits_and_writes_bfloat16():
    logits, targets, weights = hard_logits(4, 9, 200, scale=3.0)
    logits, reference = reference_logits(logits.astype(jnp.bfloat16).astype(jnp.float32), targets)
    out = softmax_cross_entropy(
        logits.astype(jnp.bfloat16),
        targets,
        weights,
        d_dtype=jnp.bfloat16,
        reference=reference,
        config=SoftmaxXentConfig(block_rows=4, block_v=64, num_warps=4, num_stages=1),
        interpret=True,
    )
    assert out.unscaled_d_logits.dtype == jnp.bfloat16 and out.max.dtype == jnp.float32
    expected = unscaled_reference(logits, targets, reference)
    np.testing.assert_allclose(out.unscaled_d_logits.astype(jnp.float32), expected, rtol=8e-3)
    np.testing.assert_allclose(out.nll, jnp_statistics(logits, targets, weights)[1], rtol=1e-5, atol=1e-5)


def test_default_one_read_config():
    assert default_one_read_config(100352) == SoftmaxXentConfig(block_rows=1, block_v=2048, num_warps=4)
    assert default_one_read_config(70) == SoftmaxXentConfig(block_rows=1, block_v=128, num_warps=4)


def test_kernel_writes_d_logits_in_the_compute_dtype():
    logits, targets, weights = hard_logits(3, 9, 200)
    config = SoftmaxXentConfig(block_rows=4, block_v=64, num_warps=4, num_stages=1)
    out = softmax_cross_entropy(logits, targets, weights, d_dtype=jnp.bfloat16, config=config, interpret=True)
    expected = jnp_statistics(logits, targets, weights)[3].astype(jnp.bfloat16)
    assert out.d_logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.d_logits.astype(jnp.float32), expected.astype(jnp.float32), rtol=8e-3, atol=1e-8)


def test_kernel_reads_bfloat16_logits_and_computes_in_float32():
    """bfloat16 logits (``logits_dtype="bfloat16"`` of the chunked loss) are read as they are; the statistics and
    d_logits come out as float32 ones of the same (rounded) values: not bfloat16 arithmetic."""
    logits, targets, weights = hard_logits(5, 11, 300, scale=8.0)
    logits = logits.at[2].set(logits[3])  # drop the +-1e4 row: its bf16 rounding is not the point here
    rounded = logits.astype(jnp.bfloat16)
    config = SoftmaxXentConfig(block_rows=4, block_v=128, num_warps=4, num_stages=1)
    out = softmax_cross_entropy(rounded, targets, weights, config=config, interpret=True)
    logsumexp, nll, argmax, d_logits = jnp_statistics(rounded.astype(jnp.float32), targets, weights)
    assert out.logsumexp.dtype == jnp.float32 and out.nll.dtype == jnp.float32 and out.d_logits.dtype == jnp.float32
    np.testing.assert_allclose(out.logsumexp, logsumexp, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.nll, nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.argmax, argmax)
    np.testing.assert_allclose(out.d_logits, d_logits, rtol=1e-5, atol=1e-7)


def test_default_config_fits_small_and_large_inputs():
    assert default_config(32768, 100352) == SoftmaxXentConfig(block_rows=8, block_v=2048, num_warps=8)
    assert default_config(2048, 100352) == SoftmaxXentConfig(block_rows=2, block_v=2048, num_warps=4)
    assert default_config(3, 70) == SoftmaxXentConfig(block_rows=1, block_v=128, num_warps=4)


def test_bad_inputs_raise():
    logits, targets, weights = hard_logits(4, 6, 20)
    with pytest.raises(ValueError, match="logits: expected shape"):
        softmax_cross_entropy(logits[0], targets, weights, interpret=True)
    with pytest.raises(ValueError, match="logits: expected a float dtype"):
        softmax_cross_entropy(logits.astype(jnp.int32), targets, weights, interpret=True)
    with pytest.raises(ValueError, match=r"targets: expected an int array of shape \(6,\)"):
        softmax_cross_entropy(logits, targets[:3], weights, interpret=True)
    with pytest.raises(ValueError, match=r"weights: expected shape \(6,\)"):
        softmax_cross_entropy(logits, targets, weights[:2], interpret=True)
    with pytest.raises(ValueError, match=r"reference: expected a float array of shape \(6,\)"):
        softmax_cross_entropy(logits, targets, weights, reference=targets, interpret=True)
    with pytest.raises(ValueError, match="block_v: expected a power of two, got 96"):
        SoftmaxXentConfig(block_v=96)
    with pytest.raises(ValueError, match="num_warps: expected a positive int"):
        SoftmaxXentConfig(num_warps=0)
    with pytest.raises(ValueError, match="statistics: expected one of"):
        lm_head_cross_entropy(jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.zeros((4,), jnp.int32), statistics="fused")


def chunked_mean_loss(hidden, kernel, targets, weights, chunk_size, groups, statistics):
    out = lm_head_cross_entropy(
        hidden, kernel, targets, weights, chunk_size=chunk_size, groups=groups, statistics=statistics, interpret=True
    )
    return out.nll_sum / jnp.maximum(out.weight_sum, 1), out


@pytest.fixture
def float32_matmuls():
    """Full float32 matmuls (on GPUs jnp's float32 matmuls default to TF32, ~1e-3 relative, on both sides)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.usefixtures("float32_matmuls")
@pytest.mark.parametrize("chunk_size, groups", [(16, 1), (5, 3)], ids=["ragged_chunks", "ragged_groups"])
def test_chunked_loss_with_the_kernel_equals_the_plain_loss(chunk_size, groups):
    """Loss, d hidden, d kernel and d weights (float32) equal the full-logits loss; hits equal two_pass's."""
    args = head_inputs(1, 45, 24, 70, jnp.float32)
    argnums = (0, 1, 3)
    expected, expected_grads = jax.value_and_grad(plain_mean_loss, argnums)(*args)
    fused = jax.jit(jax.value_and_grad(chunked_mean_loss, argnums, has_aux=True), static_argnums=(4, 5, 6))
    (actual, out), grads = fused(*args, chunk_size, groups, "pallas_gpu")
    np.testing.assert_allclose(actual, expected, rtol=2e-6)
    for name, got, want in zip(("hidden", "kernel", "weights"), grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)

    _, reference = jax.jit(chunked_mean_loss, static_argnums=(4, 5, 6))(*args, chunk_size, groups, "two_pass")
    np.testing.assert_array_equal(out.correct, reference.correct)
    _, loss_only = jax.jit(chunked_mean_loss, static_argnums=(4, 5, 6))(*args, chunk_size, groups, "pallas_gpu")
    for got, want in zip(loss_only, out):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.usefixtures("float32_matmuls")
def test_chunked_loss_with_the_kernel_counts_the_hits():
    """Targets set to the argmax on some rows: the kernel's hits equal jnp.argmax == target."""
    hidden, kernel, targets, weights = head_inputs(2, 30, 8, 40, jnp.float32)
    logits = hidden @ kernel
    targets = targets.at[:12].set(jnp.argmax(logits, axis=-1)[:12].astype(jnp.int32))
    weights = weights.at[:6].set(1.0)
    out = jax.jit(lambda t: chunked_mean_loss(hidden, kernel, t, weights, 7, 1, "pallas_gpu")[1])(targets)
    np.testing.assert_array_equal(out.correct, jnp.where(jnp.argmax(logits, axis=-1) == targets, weights, 0))
    assert int(jnp.sum(out.correct > 0)) >= 6


def assert_compiled_statistics_match(out, logits, targets, weights) -> jax.Array:
    """The compiled kernel's logsumexp, nll and argmax against jnp's of ``logits`` (float32); returns jnp's
    d_logits."""
    logsumexp, nll, argmax, d_logits = jax.jit(jnp_statistics)(logits, targets, weights)
    np.testing.assert_allclose(out.logsumexp, logsumexp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.nll, nll, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out.argmax, argmax)
    return d_logits


@pytest.mark.gpu
@pytest.mark.parametrize("rows, vocab", [(300, 100352), (64, 50257)])
def test_compiled_kernel_matches_jnp_on_gpu(rows, vocab):
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    logits, targets, weights = hard_logits(rows, rows, vocab, scale=4.0)
    out = jax.jit(lambda *a: softmax_cross_entropy(*a, d_dtype=jnp.bfloat16))(logits, targets, weights)
    d_logits = assert_compiled_statistics_match(out, logits, targets, weights)
    np.testing.assert_allclose(out.d_logits.astype(jnp.float32), d_logits, rtol=1e-2, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, vocab", [(300, 100352), (64, 50257)])
def test_compiled_one_read_kernel_matches_jnp_on_gpu(rows, vocab):
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    logits, targets, weights = hard_logits(rows, rows, vocab, scale=4.0)
    logits, reference = reference_logits(logits, targets)
    bf16_logits = logits.astype(jnp.bfloat16)
    out = jax.jit(lambda *a: softmax_cross_entropy(*a, d_dtype=jnp.bfloat16, reference=reference))(
        bf16_logits, targets, weights
    )
    rounded = bf16_logits.astype(jnp.float32)
    assert_compiled_statistics_match(out, rounded, targets, weights)
    np.testing.assert_array_equal(out.max, jnp.max(rounded, axis=-1))
    expected = jax.jit(unscaled_reference)(rounded, targets, reference)
    np.testing.assert_allclose(out.unscaled_d_logits.astype(jnp.float32), expected, rtol=1e-2)
    targets_written = out.unscaled_d_logits[jnp.arange(rows), targets].astype(jnp.float32)  # after the barrier
    np.testing.assert_allclose(targets_written, expected[jnp.arange(rows), targets], rtol=1e-2)


@pytest.mark.gpu
def test_compiled_chunked_loss_equals_the_plain_loss_on_gpu():
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    args = head_inputs(3, 1000, 64, 5000, jnp.float32)
    argnums = (0, 1, 3)
    expected, expected_grads = jax.jit(jax.value_and_grad(plain_mean_loss, argnums))(*args)

    def fused(hidden, kernel, targets, weights):
        out = lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=256, statistics="pallas_gpu")
        return out.nll_sum / jnp.maximum(out.weight_sum, 1)

    actual, grads = jax.jit(jax.value_and_grad(fused, argnums))(*args)
    np.testing.assert_allclose(actual, expected, rtol=1e-4)  # TF32 matmuls on both sides
    for name, got, want in zip(("hidden", "kernel", "weights"), grads, expected_grads):
        error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        assert error < 1e-2, (name, error)
