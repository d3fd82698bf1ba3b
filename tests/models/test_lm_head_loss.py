"""The chunked LM head + cross-entropy against plain log_softmax on full logits: values, hits, every gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.bench.loss import bench_chunk_terms, bench_lm_head_loss, bench_logits_tiles, parse_kernel_config
from m2rnn_jax.models import lm_head_loss
from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.lm_head_loss import (
    CHUNK_LOGITS_ELEMENTS,
    EXP_STATISTICS,
    default_num_chunks,
    exp_headroom,
    lm_head_cross_entropy,
)
from m2rnn_jax.models.loss import cross_entropy, language_model_loss
from m2rnn_jax.models.presets import tiny_config
from m2rnn_jax.train.step import make_eval_step
from pallas_kernels.gpu.logits_softmax_tiles import LogitsTilesConfig
from tests.parallel.fake_devices import run_on_fake_devices


def head_inputs(seed: int, num_tokens: int, width: int, vocab: int, dtype, masked: bool = True):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (num_tokens, width), dtype)
    kernel = jax.random.normal(keys[1], (width, vocab), dtype) / np.sqrt(width) * 3
    targets = jax.random.randint(keys[2], (num_tokens,), 0, vocab, dtype=jnp.int32)
    weights = jax.random.uniform(keys[3], (num_tokens,), dtype) > 0.3 if masked else jnp.ones((num_tokens,), bool)
    return hidden, kernel, targets, weights.astype(dtype)


def plain_mean_loss(hidden, kernel, targets, weights):
    """The reference: full logits, log_softmax, weighted mean over the counted tokens."""
    log_probs = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1)


def chunked_mean_loss(
    hidden, kernel, targets, weights, chunk_size=None, compute_dtype=None, groups=1, statistics="two_pass"
):
    out = lm_head_cross_entropy(
        hidden,
        kernel,
        targets,
        weights,
        chunk_size=chunk_size,
        compute_dtype=compute_dtype,
        groups=groups,
        statistics=statistics,
        interpret=statistics != "two_pass",  # the kernels in interpret mode (CPU)
    )
    return out.nll_sum / jnp.maximum(out.weight_sum, 1)


def assert_loss_and_gradients_match(args, chunk_size, rtol, atol, compute_dtype=None, groups=1, statistics="two_pass"):
    argnums = (0, 1, 3)  # hidden, kernel, weights
    expected, expected_grads = jax.value_and_grad(plain_mean_loss, argnums)(*args)
    chunked = jax.jit(jax.value_and_grad(chunked_mean_loss, argnums), static_argnums=(4, 5, 6, 7))
    actual, actual_grads = chunked(*args, chunk_size, compute_dtype, groups, statistics)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    for name, a, e in zip(("hidden", "kernel", "weights"), actual_grads, expected_grads):
        assert a.dtype == e.dtype, name
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize(
    "chunk_size,groups",
    [(8, 1), (37, 1), (100, 1), (1, 1), (4, 3), (2, 37)],
    ids=["ragged", "one_chunk", "chunk_above_n", "token_chunks", "ragged_groups", "token_groups"],
)
def test_float64_loss_and_gradients_equal_full_logits(x64, chunk_size, groups):
    args = head_inputs(0, 37, 16, 50, jnp.float64)
    assert_loss_and_gradients_match(args, chunk_size, rtol=1e-12, atol=1e-14, groups=groups)


@pytest.mark.parametrize("statistics", EXP_STATISTICS)
@pytest.mark.parametrize("chunk_size,groups", [(8, 1), (4, 3)], ids=["ragged", "ragged_groups"])
def test_exp_statistics_float64_loss_and_gradients_equal_full_logits(x64, chunk_size, groups, statistics):
    """The statistics whose gradient GEMMs read exp(logits - target logit) (interpret mode): "one_read" (the
    statistics kernel given the target logit) and "fused_matmul" (the logits GEMM with the statistics in its
    epilogue)."""
    args = head_inputs(0, 37, 16, 50, jnp.float64)
    assert_loss_and_gradients_match(args, chunk_size, rtol=1e-12, atol=1e-14, groups=groups, statistics=statistics)


@pytest.mark.parametrize("statistics", EXP_STATISTICS)
def test_exp_statistics_fall_back_where_exp_logits_would_overflow(statistics):
    """float32 rows whose maximum lies > exp_headroom (~74 at V = 40) above the target logit: exp(logits - target)
    overflows there, so the call computes its gradients again with "two_pass" (one cond outside the chunk loop)."""
    hidden, kernel, targets, weights = head_inputs(5, 24, 16, 40, jnp.float32)
    hidden = hidden.at[12:].multiply(40.0)  # chunks 2 and 3 of 4 (chunk size 6): logit gaps far above the headroom
    gaps = jnp.max(hidden @ kernel, axis=-1) - jnp.take_along_axis(hidden @ kernel, targets[:, None], -1)[:, 0]
    headroom = exp_headroom(jnp.float32, 40)
    assert float(jnp.max(gaps[:12])) < headroom < float(jnp.max(gaps[12:]))
    assert_loss_and_gradients_match((hidden, kernel, targets, weights), 6, rtol=2e-5, atol=1e-6, statistics=statistics)


def test_one_read_falls_back_in_small_chunks(monkeypatch):
    """A call that does not fit is recomputed with "two_pass" in a quarter of that one's default chunk (its
    buffers come on top of the main path's), and the loss and every gradient are still full logits'."""
    monkeypatch.setattr(lm_head_loss, "CHUNK_LOGITS_ELEMENTS", 8 * 40)  # one_read in place: 2 chunks of 12 tokens
    hidden, kernel, targets, weights = head_inputs(5, 24, 16, 40, jnp.float32)
    hidden = hidden.at[12:].multiply(40.0)  # logit gaps far above exp_headroom: the call does not fit
    layout = lm_head_loss._make_layout(
        hidden, kernel, targets, weights, None, None, 1, "one_read", jnp.float32, True, None
    )
    fallback = lm_head_loss._fallback_layout(layout, 24, 40)
    assert (layout.chunk, fallback.chunk, fallback.statistics) == (12, 2, "two_pass")  # two_pass's own: 6

    def loss(hidden, kernel, weights):
        out = lm_head_cross_entropy(
            hidden, kernel, targets, weights, statistics="one_read", logits_dtype=jnp.float32, interpret=True
        )
        return out.nll_sum / jnp.maximum(out.weight_sum, 1)

    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(hidden, kernel, weights)
    expected, expected_grads = jax.value_and_grad(plain_mean_loss, (0, 1, 3))(hidden, kernel, targets, weights)
    np.testing.assert_allclose(value, expected, rtol=2e-5)
    for name, got, want in zip(("hidden", "kernel", "weights"), grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_ties_predict_the_first_maximal_index():
    """Two equal vocabulary columns give equal logits: the prediction is the lower index, as jnp.argmax."""
    hidden, kernel, _, _ = head_inputs(13, 40, 8, 30, jnp.float32)
    first = jnp.argmax(hidden @ kernel, axis=-1).astype(jnp.int32)
    twin = (first + 1) % 30
    kernel = kernel.at[:, twin].set(kernel[:, first])  # row i: twin[i] ties with first[i] (and may override it)
    logits = hidden @ kernel
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    ties = jnp.sum(logits == jnp.max(logits, axis=-1, keepdims=True), axis=-1) > 1
    assert int(jnp.sum(ties)) >= 5
    later_tie = jnp.where(ties, (best + 1) % 30, best)
    assert (
        int(
            jnp.sum(
                (later_tie != best)
                & (jnp.take_along_axis(logits, later_tie[:, None], -1)[:, 0] == jnp.max(logits, axis=-1))
            )
        )
        >= 5
    )  # maximal but not first
    for targets in (best, later_tie):
        out = jax.jit(lambda t: lm_head_cross_entropy(hidden, kernel, t, chunk_size=7))(targets)
        np.testing.assert_array_equal(out.correct, (best == targets).astype(jnp.float32))


@pytest.mark.parametrize("masked", [True, False])
def test_float32_loss_and_gradients_equal_full_logits(masked):
    args = head_inputs(1, 45, 24, 70, jnp.float32, masked=masked)
    assert_loss_and_gradients_match(args, 16, rtol=2e-5, atol=1e-6)


def test_real_valued_weights_and_hits(x64):
    hidden, kernel, targets, _ = head_inputs(2, 29, 8, 13, jnp.float64)
    weights = jax.random.uniform(jax.random.key(3), (29,), jnp.float64)
    targets = targets.at[:10].set(jnp.argmax(hidden @ kernel, axis=-1)[:10].astype(jnp.int32))  # some certain hits
    out = jax.jit(lambda w: lm_head_cross_entropy(hidden, kernel, targets, w, chunk_size=6))(weights)
    log_probs = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    hits = jnp.argmax(hidden @ kernel, axis=-1) == targets
    np.testing.assert_allclose(out.nll_sum, jnp.sum(nll * weights), rtol=1e-12)
    np.testing.assert_allclose(out.weight_sum, jnp.sum(weights), rtol=1e-12)
    np.testing.assert_array_equal(out.correct, jnp.where(hits, weights, 0))
    assert int(jnp.sum(out.correct > 0)) >= 10

    def summed(weights):  # every output depends on the weights: check their gradient through all three
        out = lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=6)
        return out.nll_sum * 0.7 + out.weight_sum * 0.2 + jnp.sum(out.correct * jnp.arange(29.0))

    expected = 0.7 * nll + 0.2 + jnp.where(hits, jnp.arange(29.0), 0)
    np.testing.assert_allclose(jax.jit(jax.grad(summed))(weights), expected, rtol=1e-12)


def test_tied_head_gradient_flows_through_hidden_and_kernel(x64):
    """Tied embeddings: the embedding feeds both the hidden states and the head kernel (embedding.T)."""
    keys = jax.random.split(jax.random.key(4), 3)
    embedding = jax.random.normal(keys[0], (40, 12), jnp.float64)
    ids = jax.random.randint(keys[1], (33,), 0, 40)
    targets = jax.random.randint(keys[2], (33,), 0, 40)
    weights = jnp.ones((33,), jnp.float64)

    def loss(embedding, head_loss):
        return head_loss(jnp.tanh(embedding[ids]), embedding.T, targets, weights)

    expected = jax.grad(loss)(embedding, plain_mean_loss)
    actual = jax.jit(jax.grad(loss), static_argnums=1)(embedding, lambda *a: chunked_mean_loss(*a, chunk_size=5))
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14)


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 inputs with float32 parameters: loss and gradients within bf16 rounding of the float32 reference."""
    hidden, kernel, targets, weights = head_inputs(5, 64, 32, 96, jnp.float32)
    expected, (d_hidden, d_kernel) = jax.value_and_grad(plain_mean_loss, (0, 1))(hidden, kernel, targets, weights)
    hidden_bf16 = hidden.astype(jnp.bfloat16)
    fn = jax.jit(jax.value_and_grad(lambda h, k: chunked_mean_loss(h, k, targets, weights, 24, jnp.bfloat16), (0, 1)))
    actual, (a_hidden, a_kernel) = fn(hidden_bf16, kernel)
    assert a_hidden.dtype == jnp.bfloat16 and a_kernel.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-2)
    for a, e in ((a_hidden, d_hidden), (a_kernel, d_kernel)):
        error = float(jnp.linalg.norm(a.astype(jnp.float32) - e) / jnp.linalg.norm(e))
        assert error < 2e-2, error


def plain_rounded_logits_loss(hidden, kernel, targets, weights):
    """The plain bfloat16 head as PyTorch's autocast computes it: logits accumulated in float32 and rounded once to
    bfloat16, then a float32 log_softmax."""
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1)


@pytest.mark.parametrize("statistics", ["two_pass", "pallas_gpu", "one_read"])
def test_bfloat16_logits_give_the_plain_bfloat16_head(statistics):
    """``logits_dtype="bfloat16"``: the loss is the float32 softmax of the once-rounded logits (the plain bf16
    head's value), the gradients stay within bf16 rounding of the float32 ones, and the statistics agree."""
    hidden, kernel, targets, weights = head_inputs(12, 40, 16, 96, jnp.float32)
    hidden, kernel = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)

    def chunked(h, k, logits_dtype, statistics):
        out = lm_head_cross_entropy(
            h,
            k,
            targets,
            weights,
            chunk_size=16,
            statistics=statistics,
            logits_dtype=logits_dtype,
            interpret=statistics != "two_pass",
        )
        return out.nll_sum / jnp.maximum(out.weight_sum, 1)

    grad = jax.jit(jax.value_and_grad(chunked, (0, 1)), static_argnums=(2, 3))
    value, grads = grad(hidden, kernel, jnp.bfloat16, statistics)
    np.testing.assert_allclose(value, plain_rounded_logits_loss(hidden, kernel, targets, weights), rtol=1e-6)
    exact_value, exact_grads = grad(hidden, kernel, None, "two_pass")  # float32 logits
    assert abs(float(value - exact_value)) < 1e-2 * float(exact_value) and float(value) != float(exact_value)
    for name, a, e in zip(("hidden", "kernel"), grads, exact_grads):
        assert a.dtype == e.dtype == jnp.bfloat16, name
        a, e = a.astype(jnp.float32), e.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e)) < 2e-2, name
    if statistics != "two_pass":
        same_value, same_grads = grad(hidden, kernel, jnp.bfloat16, "two_pass")
        np.testing.assert_allclose(value, same_value, rtol=1e-6)
        for name, a, e in zip(("hidden", "kernel"), grads, same_grads):
            a, e = a.astype(jnp.float32), e.astype(jnp.float32)
            if statistics == "pallas_gpu":  # the same d logits, element by element
                np.testing.assert_allclose(a, e, rtol=1e-2, atol=1e-6, err_msg=name)
            else:  # one_read: the GEMMs read bf16 exp(logits - target logit), the one-hot part apart
                assert float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e)) < 5e-3, name


def test_value_without_gradient_equals_value_of_the_forward_rule():
    args = head_inputs(6, 21, 8, 30, jnp.float32)

    def loss_and_outputs(hidden):
        out = lm_head_cross_entropy(hidden, *args[1:], chunk_size=4)
        return out.nll_sum, out

    primal = jax.jit(loss_and_outputs)(args[0])[1]
    (_, with_grad), _ = jax.jit(jax.value_and_grad(loss_and_outputs, has_aux=True))(args[0])
    for a, b in zip(primal, with_grad):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_chunked_head_never_holds_all_float32_logits():
    """The compiled forward+backward allocates far less than the (N, V) float32 logits of the plain version."""
    hidden, kernel, targets, weights = head_inputs(7, 2048, 32, 1024, jnp.float32)
    full_logits_bytes = 2048 * 1024 * 4

    def temp_bytes(loss_fn):
        grad = jax.jit(jax.grad(loss_fn, (0, 1)))
        return grad.lower(hidden, kernel, targets, weights).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(plain_mean_loss) >= full_logits_bytes
    assert temp_bytes(lambda *a: chunked_mean_loss(*a, chunk_size=128)) < full_logits_bytes / 4


def test_default_chunking_bounds_the_chunk_logits():
    assert default_num_chunks(8 * 4096, 100352) == 16  # 2048 tokens per chunk
    assert default_num_chunks(8 * 4096, 100352, "fused_matmul", jnp.bfloat16) == 8  # E in bf16: 4096 tokens
    assert default_num_chunks(8 * 4096, 100352, "fused_matmul", jnp.float32) == 16
    assert default_num_chunks(8 * 4096, 100352, "pallas_gpu", jnp.bfloat16) == 16  # float32 logits
    assert default_num_chunks(8 * 4096, 100352, "two_pass", jnp.bfloat16, jnp.bfloat16) == 8  # bf16 logits
    assert default_num_chunks(8 * 4096, 100352, "one_read", jnp.bfloat16, jnp.bfloat16) == 4  # D over the logits
    assert default_num_chunks(8 * 4096, 100352, "one_read", jnp.bfloat16, jnp.float32) == 16  # D beside them
    assert default_num_chunks(100, 50) == 1
    assert default_num_chunks(2, CHUNK_LOGITS_ELEMENTS // 2) == 1
    assert default_num_chunks(1000, CHUNK_LOGITS_ELEMENTS // 100) == 16
    assert default_num_chunks(3, CHUNK_LOGITS_ELEMENTS) == 3  # at most one chunk per token


def test_bad_inputs_raise():
    hidden, kernel, targets, weights = head_inputs(8, 6, 4, 5, jnp.float32)
    with pytest.raises(ValueError, match="hidden: expected shape"):
        lm_head_cross_entropy(hidden[0], kernel, targets)
    with pytest.raises(ValueError, match="kernel: expected shape"):
        lm_head_cross_entropy(hidden, kernel.T, targets)
    with pytest.raises(ValueError, match="targets: expected an int array"):
        lm_head_cross_entropy(hidden, kernel, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match="weights: expected shape"):
        lm_head_cross_entropy(hidden, kernel, targets, weights[:3])
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        lm_head_cross_entropy(hidden, kernel, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"groups: expected an int in \[1, N=6\]"):
        lm_head_cross_entropy(hidden, kernel, targets, groups=7)
    for statistics in ("pallas_gpu", "one_read", "fused_matmul"):  # the kernels need a GPU
        with pytest.raises(ValueError, match=f"statistics: expected 'two_pass' on cpu .'{statistics}' runs on"):
            lm_head_cross_entropy(hidden, kernel, targets, statistics=statistics)
    with pytest.raises(ValueError, match="logits_dtype: expected a float dtype or None, got 'int32'"):
        lm_head_cross_entropy(hidden, kernel, targets, logits_dtype="int32")
    with pytest.raises(ValueError, match="logits_dtype: expected a float dtype or None, got 'half-float'"):
        lm_head_cross_entropy(hidden, kernel, targets, logits_dtype="half-float")
    with pytest.raises(ValueError, match="logits_dtype: expected None with statistics='fused_matmul'"):
        lm_head_cross_entropy(
            hidden, kernel, targets, statistics="fused_matmul", logits_dtype=jnp.bfloat16, interpret=True
        )
    for statistics in EXP_STATISTICS:  # E = exp(logits - target logit) would overflow float16
        with pytest.raises(ValueError, match=f"compute_dtype: expected one of .* with statistics='{statistics}'"):
            lm_head_cross_entropy(
                hidden, kernel, targets, compute_dtype=jnp.float16, statistics=statistics, interpret=True
            )


@pytest.mark.parametrize(
    "nvidia, compute_dtype, expected",
    [(False, jnp.bfloat16, "two_pass"), (True, jnp.bfloat16, "one_read"), (True, jnp.float16, "two_pass")],
)
def test_auto_statistics_take_one_read_on_nvidia_gpus_only(monkeypatch, nvidia, compute_dtype, expected):
    """statistics="auto" is "one_read" on NVIDIA GPUs with a compute dtype it takes, "two_pass" elsewhere; the
    layout carries the resolved choice, so the call runs exactly what that choice runs."""
    monkeypatch.setattr(lm_head_loss, "on_nvidia_gpu", lambda: nvidia)
    hidden, kernel, targets, weights = head_inputs(2, 24, 16, 40, jnp.float32)
    layout = lm_head_loss._make_layout(
        hidden, kernel, targets, weights, None, compute_dtype, 1, "auto", None, False, None
    )
    assert lm_head_loss.auto_statistics(compute_dtype) == layout.statistics == expected
    kwargs = dict(compute_dtype=compute_dtype, interpret=True)
    auto = lm_head_cross_entropy(hidden, kernel, targets, weights, statistics="auto", **kwargs)
    chosen = lm_head_cross_entropy(hidden, kernel, targets, weights, statistics=expected, **kwargs)
    for got, want in zip(auto, chosen):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("groups, expected", [(1, "pallas_gpu"), (2, "two_pass")])
def test_training_loss_takes_the_head_statistics_of_the_model_config(monkeypatch, groups, expected):
    """head_loss_sums hands model.config.head_statistics to the head with one token group, the jnp path with more."""
    from m2rnn_jax.models import loss as loss_module

    seen = []

    def spy(*args, statistics, **kwargs):
        seen.append(statistics)
        return lm_head_cross_entropy(*args, **kwargs, statistics="pallas_gpu", interpret=True)

    ids = jax.random.randint(jax.random.key(3), (2, 5), 0, 256, dtype=jnp.int32)
    expected_head, _ = loss_module.head_loss_sums(Decoder(tiny_config("A"), rngs=nnx.Rngs(0)), ids, ids, groups=groups)
    monkeypatch.setattr(loss_module, "lm_head_cross_entropy", spy)
    model = Decoder(tiny_config("A").replace(head_statistics="pallas_gpu"), rngs=nnx.Rngs(0))
    head, _ = loss_module.head_loss_sums(model, ids, ids, groups=groups)
    assert seen == [expected]
    np.testing.assert_allclose(head.nll_sum, expected_head.nll_sum, rtol=1e-6)


def test_training_loss_takes_the_head_logits_of_the_model_config(monkeypatch):
    """head_loss_sums passes the compute dtype as logits_dtype when model.config.head_logits is "compute", except to
    "fused_matmul", which writes no logits (with several token groups the jnp statistics run instead, and get it)."""
    from m2rnn_jax.models import loss as loss_module

    seen = []

    def spy(*args, statistics, logits_dtype, **kwargs):
        seen.append((statistics, logits_dtype))
        return lm_head_cross_entropy(*args, **kwargs, logits_dtype=logits_dtype)  # the jnp statistics on CPU

    monkeypatch.setattr(loss_module, "lm_head_cross_entropy", spy)
    ids = jax.random.randint(jax.random.key(4), (2, 5), 0, 256, dtype=jnp.int32)
    config = tiny_config("A").replace(dtype="bfloat16")
    sums = {}
    for head_logits in ("float32", "compute"):
        model = Decoder(config.replace(head_logits=head_logits), rngs=nnx.Rngs(0))
        sums[head_logits] = loss_module.head_loss_sums(model, ids, ids)[0].nll_sum
    assert seen == [("two_pass", None), ("two_pass", jnp.bfloat16)]
    assert float(sums["float32"]) != float(sums["compute"])  # the logits were rounded
    np.testing.assert_allclose(sums["compute"], sums["float32"], rtol=1e-2)
    seen.clear()
    fused = Decoder(config.replace(head_logits="compute", head_statistics="fused_matmul"), rngs=nnx.Rngs(0))
    loss_module.head_loss_sums(fused, ids, ids)
    loss_module.head_loss_sums(fused, ids, ids, groups=2)
    assert seen == [("fused_matmul", None), ("two_pass", jnp.bfloat16)]


def test_token_groups_keep_the_kernel_gradient_all_reduce_out_of_the_chunk_loop():
    """8 fake CPU devices (subprocess): sharded == unsharded, and one group per device moves the all-reduce of the
    kernel gradient out of the loop (with one group it is inside, once per chunk); the train step's group count is
    the number of batch shards of the ambient mesh."""
    facts = dict(line.split() for line in run_on_fake_devices("tests.models.lm_head_loss_sharded", timeout=600))
    for groups in (1, 8):
        assert float(facts[f"groups{groups}_value_error"]) < 1e-5, facts
        assert float(facts[f"groups{groups}_grad_error"]) < 1e-6, facts
    assert int(facts["groups1_collectives_in_loops"]) > 0, facts
    assert int(facts["groups8_collectives_in_loops"]) == 0, facts
    expected_shards = {"no_mesh": 1, "data8": 8, "fsdp4_tensor2": 4, "data2_fsdp2_tensor2": 4}
    assert {key: int(facts[f"batch_shards_{key}"]) for key in expected_shards} == expected_shards, facts


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_decoder_hidden_times_head_kernel_gives_the_logits(tied):
    model = Decoder(tiny_config("A").replace(tie_embeddings=tied), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(14), (2, 5), 0, 256, dtype=jnp.int32)
    full = nnx.jit(lambda m: m(ids))(model)
    hidden = nnx.jit(lambda m: m(ids, return_hidden=True))(model)
    assert full.hidden is None and hidden.logits is None and hidden.hidden.shape == (2, 5, 64)
    assert model.head_kernel().shape == (64, 256)
    np.testing.assert_allclose(hidden.hidden @ model.head_kernel(), full.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hidden.aux_loss, full.aux_loss)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_language_model_loss_equals_full_logits_loss(tied):
    """The decoder's training loss (chunked head) equals cross_entropy on its full logits, gradients included."""
    model = Decoder(tiny_config("A").replace(tie_embeddings=tied), rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(9), 2)
    inputs = jax.random.randint(keys[0], (2, 7), 0, 256, dtype=jnp.int32)
    targets = jax.random.randint(keys[1], (2, 7), 0, 256, dtype=jnp.int32)
    mask = jnp.ones((2, 7), jnp.int32).at[0, :3].set(0)

    def full_logits_loss(model):
        output = model(inputs)
        return cross_entropy(output.logits, targets, mask)[0] + output.aux_loss

    chunked = nnx.jit(nnx.value_and_grad(lambda m: language_model_loss(m, inputs, targets, loss_mask=mask)[0]))
    loss, grads = chunked(model)
    expected, expected_grads = nnx.jit(nnx.value_and_grad(full_logits_loss))(model)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-7)


def test_eval_sums_equal_the_full_logits_metrics():
    """cross_entropy_sum, correct, tokens and correct_last of the step equal those computed from full logits."""
    config = tiny_config("A", vocab_size=8)  # a small vocabulary so that some predictions are right
    model = Decoder(config, rngs=nnx.Rngs(1))
    keys = jax.random.split(jax.random.key(10), 2)
    inputs = jax.random.randint(keys[0], (4, 9), 0, 8, dtype=jnp.int32)
    targets = jax.random.randint(keys[1], (4, 9), 0, 8, dtype=jnp.int32)
    mask = jnp.ones((4, 9), jnp.int32).at[1, -1].set(0)
    graphdef, params = nnx.split(model, nnx.Param)
    sums = jax.jit(make_eval_step(graphdef))(params, {"inputs": inputs, "targets": targets, "loss_mask": mask})
    logits = model(inputs).logits
    mean, tokens = cross_entropy(logits, targets, mask)
    correct = (jnp.argmax(logits, axis=-1) == targets) * (mask != 0)
    assert float(sums["tokens"]) == int(tokens) == 35
    np.testing.assert_allclose(sums["cross_entropy_sum"], mean * 35, rtol=1e-5)
    assert float(sums["correct"]) == int(jnp.sum(correct)) > 0
    assert float(sums["correct_last"]) == int(jnp.sum(correct[:, -1]))
    assert float(sums["rows"]) == 4


def test_bench_times_both_versions_at_a_tiny_shape():
    result = bench_lm_head_loss(2, 16, 8, 64, "float32", 1, 1, chunk_size=8)
    assert result["chunk_tokens"] == 8
    for prefix in ("", "plain_"):
        for key in ("forward_ms", "fwd_bwd_ms", "fwd_bwd_temp_gib", "compile_s"):
            assert result[prefix + key] > 0, prefix + key
    for key in ("loss_rel_diff", "d_hidden_rel_diff", "d_kernel_rel_diff"):
        assert result[key] < 1e-5, key


def test_bench_profile_puts_the_device_time_on_the_loss_code(tmp_path):
    result = bench_lm_head_loss(
        2, 16, 8, 64, "float32", 1, 1, chunk_size=8, compare_plain=False, profile_dir=str(tmp_path)
    )
    profile = result["profile"]
    assert profile["device_ms_per_step"] > 0, profile
    assert profile["by_source_file"][0]["name"] == "models/lm_head_loss.py", profile["by_source_file"]
    assert (tmp_path / "loss_8_two_pass_float32" / "loss_8_two_pass_float32.hlo.txt.gz").exists()


@pytest.mark.parametrize("statistics", ["pallas_gpu", "one_read", "fused_matmul"])
def test_bench_times_the_fused_statistics_in_interpret_mode(statistics):
    result = bench_lm_head_loss(2, 16, 8, 64, "float32", 1, 1, chunk_size=8, statistics=statistics, interpret=True)
    assert result["statistics"] == statistics and result["fwd_bwd_ms"] > 0
    for key in ("loss_rel_diff", "d_hidden_rel_diff", "d_kernel_rel_diff"):
        assert result[key] < 1e-5, key


def test_bench_times_the_fused_logits_gemm_configs_in_interpret_mode():
    rows = bench_logits_tiles(20, 16, 100, "float32", 1, 1, [LogitsTilesConfig.parse("16x32x16x4x2")], True)
    assert [row["variant"] for row in rows] == ["xla_gemm", "fused_matmul"], rows
    assert rows[1]["config"] == "16x32x16x4x2" and rows[1]["lse_max_diff"] < 1e-5, rows
    assert rows[1]["with_exp_ms"] > 0 and rows[1]["stats_ms"] > 0 and rows[0]["tflops"] > 0, rows


def test_bench_times_the_statistics_kernel_configs_in_interpret_mode():
    config = parse_kernel_config("4x128x4x1")
    assert (config.block_rows, config.block_v, config.num_warps, config.num_stages) == (4, 128, 4, 1)
    rows = bench_chunk_terms(10, 300, "float32", 1, 1, [config], interpret=True, one_read_configs=[config])
    assert [row["variant"] for row in rows] == ["two_pass", "pallas_gpu", "one_read", "logits_copy"], rows
    assert rows[1]["config"] == rows[2]["config"] == "4x128x4x1" and rows[2]["stats_ms"] is None, rows
    assert rows[3]["grad_ms"] > 0, rows
    for row in rows[1:3]:
        assert row["hits_equal"] and row["nll_max_diff"] < 1e-5 and row["d_max_diff"] < 1e-6, rows
    bf16 = bench_chunk_terms(10, 300, "bfloat16", 1, 1, [], True, [config], logits_dtype="bfloat16")
    assert bf16[1]["variant"] == "one_read" and bf16[1]["hits_equal"] and bf16[1]["nll_max_diff"] < 1e-5, bf16
    with pytest.raises(ValueError, match="kernel config: expected ROWSxCOLSxWARPSxSTAGES"):
        parse_kernel_config("8x2048")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "statistics, logits_dtype",
    [
        ("pallas_gpu", None),
        ("fused_matmul", None),
        ("two_pass", "bfloat16"),
        ("pallas_gpu", "bfloat16"),
        ("one_read", "bfloat16"),
    ],
)
def test_gpu_target_shape_with_the_fused_kernels_matches_the_plain_head(statistics, logits_dtype):
    """As below with the fused statistics kernel, the fused logits GEMM or bfloat16 logits: the same memory bound
    and agreement with the plain head."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    result = bench_lm_head_loss(
        8, 4096, 1024, 100352, "bfloat16", 2, 2, statistics=statistics, logits_dtype=logits_dtype
    )
    assert result["fwd_bwd_temp_gib"] <= 3.0, result
    assert result["loss_rel_diff"] < 1e-3, result
    assert result["d_hidden_rel_diff"] < 2e-2 and result["d_kernel_rel_diff"] < 2e-2, result


@pytest.mark.gpu
def test_gpu_target_shape_fits_in_three_gib_and_matches_the_plain_head():
    """N = 8x4096, h = 1024, V = 100352, bf16 compute: at most 3 GiB of temporaries for forward+backward, loss and
    gradients within bf16 rounding of the plain full-logits head (times are reported by the benchmark, not asserted)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    result = bench_lm_head_loss(8, 4096, 1024, 100352, "bfloat16", 2, 2)
    assert result["fwd_bwd_temp_gib"] <= 3.0, result
    assert result["loss_rel_diff"] < 1e-3, result
    assert result["d_hidden_rel_diff"] < 2e-2 and result["d_kernel_rel_diff"] < 2e-2, result
