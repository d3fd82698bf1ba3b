"""LM head + token cross-entropy computed chunk by chunk: the (N, V) logits never exist at once.

For N tokens with final hidden states ``hidden`` (N, h), head kernel ``kernel`` (h, V), targets ``t`` (N,) and
token weights ``w`` (N,):

    logits_i = hidden_i @ kernel                                  (compute dtype in, float32 accumulation)
    nll_i    = logsumexp(logits_i) - logits_i[t_i]                (float32)

The logits are written in float32 (``logits_dtype`` None), or rounded to a lower dtype such as the compute dtype
(``logits_dtype="bfloat16"``: what the plain head ``hidden @ kernel`` gives in bfloat16 and what PyTorch's
autocast gives; half the bytes written and read per logit); the statistics are float32 either way.
    loss     = sum_i w_i nll_i                                    (divide by sum_i w_i for the mean)

Layout: the N tokens form ``groups`` contiguous groups (G, N / G) and each group is cut into ``num_chunks``
chunks; a ``lax.scan`` walks the chunks, holding the logits (G, chunk, V) of one chunk of every group at a time.
Chunk j of a group takes its rows ``i * num_chunks + j`` (strided, like the micro-batches of
:mod:`m2rnn_jax.train.step`). With ``groups`` = the number of devices the tokens are split over (contiguous blocks,
as a batch split over the data/fsdp mesh axes), each device computes its own group: the scan axis is never a
sharded one and the kernel gradient is accumulated per group, (G, h, V), and summed once after the scan (a single
all-reduce; with one group the partitioner all-reduces the (h, V) gradient after every chunk).

Gradients ("fused linear cross-entropy"): differentiating the loss needs ``d logits_i = w_i (softmax(logits_i) -
onehot(t_i))``, then ``d hidden = d logits @ kernel.T`` and ``d kernel = hidden.T @ d logits``. Recomputing the
logits in the backward would cost a fourth (N, h, V) matmul, so the forward rule of the custom VJP computes both
gradients chunk by chunk right after each chunk's logits, keeps them as residuals ((N, h) and (h, V), float32), and
the backward only scales them by the incoming cotangent of ``loss``. The summed loss is linear in that cotangent,
so dividing by the weight sum afterwards (a mean over counted tokens) gives exact gradients. Without
differentiation only the loss is computed (no gradient work).

Statistics (``statistics``): how each chunk's float32 logits are turned into (logsumexp, nll, argmax) and
``d logits``. "two_pass" (jnp, the default): an argmax reduction, a sum-of-exp reduction, then an elementwise
pass that reads the logits and writes ``d logits`` (three reads of the logits with the gradient, two without).
"pallas_gpu": one fused kernel (:mod:`pallas_kernels.gpu.softmax_xent`, Pallas on Triton, NVIDIA GPUs; any backend
with ``interpret=True``) that keeps running statistics over vocabulary blocks, then writes ``d logits`` (two reads
with the gradient, one without). "one_read": the kernel's one-read form, given each row's target logit c (a
gather-dot of (C, h), computed first), reads the logits once and writes, in the same pass, D = exp(logits - c) -
exp(logsumexp - c) onehot(target) in the compute dtype, d logits up to a row scale; the two gradient GEMMs read D
with that scale (:func:`_row_scaled_gradients`). "fused_matmul": no logits in memory at all; the logits GEMM is a
Pallas kernel (:mod:`pallas_kernels.gpu.logits_softmax_tiles`) with the statistics in its epilogue, which writes
E = exp(logits - c); the GEMMs read E with the row scale and the one-hot part is a gather and a scatter. When
exp(logits - c) could overflow in any chunk (a row's maximum more than :func:`exp_headroom`, ~69, above c),
"one_read" and "fused_matmul" compute the whole call again with "two_pass". All give the same values up to float
rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from m2rnn_jax.checks import is_int, require
from m2rnn_jax.ops.platform import default_platform, on_nvidia_gpu

# Default chunking: enough chunks that one chunk's logits hold at most this many elements (1 GiB in float32).
CHUNK_LOGITS_ELEMENTS = 2**28

# The ways to compute a chunk's softmax statistics and logits gradient (the module docstring).
STATISTICS = ("two_pass", "pallas_gpu", "one_read", "fused_matmul")
# What ``statistics`` accepts: one of those, or "auto", the fastest measured where it runs (:func:`auto_statistics`).
STATISTICS_CHOICES = (*STATISTICS, "auto")
# The statistics whose gradient GEMMs read exp(logits - target logit) with a row scale (:func:`_row_scaled_gradients`).
EXP_STATISTICS = ("one_read", "fused_matmul")
# Compute dtypes those accept: E must not overflow float16's small range.
EXP_DTYPES = ("bfloat16", "float32", "float64")


# What one chunk step gives: (nll, hits, (d hidden, add d kernel to a running sum) or None, gradient valid).
ChunkResult = tuple[jax.Array, jax.Array, tuple[jax.Array, Callable[[jax.Array], jax.Array]] | None, jax.Array]


class LMHeadLoss(NamedTuple):
    """What :func:`lm_head_cross_entropy` returns (float32, or float64 when computing in float64).

    Attributes:
        nll_sum: () sum over tokens of ``weight * (logsumexp(logits) - logits[target])``; differentiable.
        weight_sum: () sum of the weights (the number of counted tokens for 0/1 weights).
        correct: (N,) ``weight`` where ``argmax(logits) == target`` (first index on ties), else 0.
    """

    nll_sum: jax.Array
    weight_sum: jax.Array
    correct: jax.Array


class _Layout(NamedTuple):
    """Static facts the custom VJP needs (hashable: a non-differentiable argument)."""

    groups: int
    num_chunks: int
    chunk: int
    compute_dtype: Any
    hidden_dtype: Any
    kernel_dtype: Any
    statistics: str
    logits_dtype: Any  # the dtype the logits GEMM writes ("two_pass", "pallas_gpu", "one_read")
    interpret: bool
    tiles_config: Any  # LogitsTilesConfig or None (pallas_kernels is imported only when a kernel runs)


def default_num_chunks(
    num_tokens: int,
    vocab_size: int,
    statistics: str = "two_pass",
    compute_dtype: Any = None,
    logits_dtype: Any = None,
) -> int:
    """The smallest power of two of chunks such that a chunk's (C, V) intermediate takes at most the bytes of
    :data:`CHUNK_LOGITS_ELEMENTS` float32 values, 1 GiB (at most ``num_tokens`` chunks): the logits in
    ``logits_dtype`` (None: float32), or for "fused_matmul" exp(logits - target logit) in ``compute_dtype``
    (bfloat16: twice the tokens per chunk; measured on the H200, "fused_matmul" at 4096-token chunks 39.84 ms
    against 40.44 at 2048, RESULTS.md session 13). "one_read" with the logits in the compute dtype writes its
    gradient over the logits, so it holds one (C, V) buffer where "pallas_gpu" holds two: it takes twice the tokens
    per chunk (measured on the H100 at 8 x 4096 x 100352: 35.29 ms and 1.91 GiB at 8192-token chunks against 36.73 ms
    and 1.13 GiB at 4096, RESULTS.md session 18)."""
    elements = CHUNK_LOGITS_ELEMENTS
    stored = compute_dtype if statistics == "fused_matmul" else logits_dtype
    if stored is not None:
        elements = CHUNK_LOGITS_ELEMENTS * 4 // jnp.dtype(stored).itemsize
    in_place = statistics == "one_read" and logits_dtype is not None and compute_dtype is not None
    if in_place and jnp.dtype(logits_dtype) == jnp.dtype(compute_dtype):
        elements *= 2
    needed = max(1, math.ceil(num_tokens * vocab_size / elements))
    return min(num_tokens, 1 << (needed - 1).bit_length())


def auto_statistics(compute_dtype: Any) -> str:
    """What ``statistics="auto"`` runs: "one_read" on NVIDIA GPUs with a compute dtype it takes
    (:data:`EXP_DTYPES`), the fastest measured (H100, 400M head with bfloat16 logits: 35.29 ms against
    "pallas_gpu"'s 38.38, RESULTS.md session 18); "two_pass" elsewhere (CPU, TPU, float16)."""
    if on_nvidia_gpu() and jnp.dtype(compute_dtype).name in EXP_DTYPES:
        return "one_read"
    return "two_pass"


def lm_head_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
    compute_dtype: Any = None,
    groups: int = 1,
    statistics: str = "two_pass",
    logits_dtype: Any = None,
    interpret: bool = False,
    tiles_config: Any = None,
) -> LMHeadLoss:
    """Summed weighted token cross-entropy of the LM head ``hidden @ kernel``, chunked over tokens.

    Args:
        hidden: (N, h) final hidden states (after the final norm).
        kernel: (h, V) head kernel; for tied embeddings pass ``embedding.T``.
        targets: (N,) int target ids in [0, V) (not checked: ids outside give undefined values).
        weights: optional (N,) float token weights (0 drops a token); default all ones.
        chunk_size: at most this many tokens per chunk of a group; default: :func:`default_num_chunks` of N / G.
        compute_dtype: dtype the matmul inputs are cast to (the model's compute dtype); default ``hidden.dtype``.
            Products accumulate in ``promote_types(float32, compute_dtype)``, and the softmax runs in that dtype.
        groups: G, the number of contiguous token groups (see the module docstring): the number of devices the
            tokens are split over, 1 on one device. Each group holds its own (h, V) float32 kernel gradient.
        statistics: one of :data:`STATISTICS_CHOICES` (the module docstring): "two_pass" (jnp, any backend),
            "pallas_gpu" (the fused statistics kernel), "one_read" (its one-read form, writing d logits up to a row
            scale in its single read), "fused_matmul" (the logits GEMM with the statistics in its epilogue) or
            "auto" (:func:`auto_statistics`: "one_read" on NVIDIA GPUs, else "two_pass"); "one_read" and
            "fused_matmul" take compute dtype bfloat16, float32 or float64; the kernels run on NVIDIA GPUs, or on
            any backend with ``interpret``.
        logits_dtype: the float dtype the logits GEMM writes ("two_pass", "pallas_gpu" and "one_read";
            "fused_matmul" writes none): None (default) the accumulation dtype, float32; a lower one (the compute
            dtype, e.g. "bfloat16", as the plain ``hidden @ kernel`` gives) rounds each logit once, halves the
            bytes the statistics read and doubles the default chunk; the statistics still run in float32.
        interpret: run the kernels in Pallas interpret mode (tests on CPU).
        tiles_config: launch parameters of the "fused_matmul" kernel
            (:class:`pallas_kernels.gpu.logits_softmax_tiles.LogitsTilesConfig`); default its ``default_config``.

    Returns:
        :class:`LMHeadLoss`. Gradients flow to ``hidden``, ``kernel`` and ``weights`` through ``nll_sum``,
        ``weight_sum`` and ``correct`` (the last two only to ``weights``).

    Raises:
        ValueError: on shapes that do not fit together, a bad ``chunk_size``, ``groups`` or ``statistics``.
    """
    if weights is None:
        weights = jnp.ones(hidden.shape[:1], dtype=jnp.float32)
    layout = _make_layout(
        hidden,
        kernel,
        targets,
        weights,
        chunk_size,
        compute_dtype,
        groups,
        statistics,
        logits_dtype,
        interpret,
        tiles_config,
    )
    accumulation = jnp.promote_types(jnp.float32, layout.compute_dtype)
    return _chunked_loss(layout, hidden, kernel, targets.astype(jnp.int32), weights.astype(accumulation))


def _make_layout(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk_size: int | None,
    compute_dtype: Any,
    groups: int,
    statistics: str,
    logits_dtype: Any,
    interpret: bool,
    tiles_config: Any,
) -> _Layout:
    """Validates the arguments of :func:`lm_head_cross_entropy` and derives the chunk layout."""
    require(hidden.ndim == 2 and hidden.shape[0] > 0, "hidden", "shape (N, h) with N >= 1", hidden.shape)
    num_tokens, width = hidden.shape
    require(kernel.ndim == 2 and kernel.shape[0] == width, "kernel", f"shape ({width}, V)", kernel.shape)
    require(
        targets.shape == (num_tokens,) and jnp.issubdtype(targets.dtype, jnp.integer),
        "targets",
        f"an int array of shape ({num_tokens},)",
        f"{targets.dtype} {targets.shape}",
    )
    require(weights.shape == (num_tokens,), "weights", f"shape ({num_tokens},)", weights.shape)
    require(
        chunk_size is None or (is_int(chunk_size) and chunk_size > 0),
        "chunk_size",
        "a positive int or None",
        chunk_size,
    )
    require(is_int(groups) and 0 < groups <= num_tokens, "groups", f"an int in [1, N={num_tokens}]", groups)
    require(statistics in STATISTICS_CHOICES, "statistics", f"one of {STATISTICS_CHOICES}", statistics)
    compute = jnp.dtype(hidden.dtype if compute_dtype is None else compute_dtype)
    if statistics == "auto":
        statistics = auto_statistics(compute)
    require(
        statistics == "two_pass" or interpret or on_nvidia_gpu(),
        "statistics",
        f"'two_pass' on {default_platform()} ('{statistics}' runs on NVIDIA GPUs, or with interpret=True)",
        statistics,
    )
    require(
        statistics not in EXP_STATISTICS or compute.name in EXP_DTYPES,
        "compute_dtype",
        f"one of {EXP_DTYPES} with statistics='{statistics}'",
        compute.name,
    )
    accumulation = jnp.promote_types(jnp.float32, compute)
    if logits_dtype is not None:
        require(
            statistics != "fused_matmul",
            "logits_dtype",
            "None with statistics='fused_matmul' (it writes no logits)",
            logits_dtype,
        )
        logits_dtype = _float_dtype(logits_dtype, "logits_dtype")
    group_tokens = math.ceil(num_tokens / groups)
    if chunk_size is None:
        num_chunks = default_num_chunks(group_tokens, kernel.shape[1], statistics, compute, logits_dtype)
    else:
        num_chunks = math.ceil(group_tokens / chunk_size)
    return _Layout(
        groups=groups,
        num_chunks=num_chunks,
        chunk=math.ceil(group_tokens / num_chunks),
        compute_dtype=compute,
        hidden_dtype=jnp.dtype(hidden.dtype),
        kernel_dtype=jnp.dtype(kernel.dtype),
        statistics=statistics,
        logits_dtype=accumulation if logits_dtype is None else logits_dtype,
        interpret=bool(interpret),
        tiles_config=tiles_config,
    )


def _float_dtype(value: Any, name: str) -> Any:
    """``value`` as a float numpy dtype, or a ValueError naming ``name``."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    require(dtype is not None and jnp.issubdtype(dtype, jnp.floating), name, "a float dtype or None", value)
    return dtype


def _to_chunks(x: jax.Array, layout: _Layout) -> jax.Array:
    """(N, ...) -> (num_chunks, G, chunk, ...): row g * (chunk * num_chunks) + i * num_chunks + j goes to chunk j,
    group g, position i (zero rows pad the end)."""
    padding = layout.groups * layout.chunk * layout.num_chunks - x.shape[0]
    if padding:
        x = jnp.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape((layout.groups, layout.chunk, layout.num_chunks) + x.shape[1:])
    return jnp.moveaxis(x, 2, 0)


def _from_chunks(x: jax.Array, num_tokens: int) -> jax.Array:
    """Inverse of :func:`_to_chunks`: (num_chunks, G, chunk, ...) -> (N, ...)."""
    return jnp.moveaxis(x, 0, 2).reshape((-1,) + x.shape[3:])[:num_tokens]


def _chunk_inputs(
    layout: _Layout, hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Casts to the compute dtype and cuts the per-token arrays into chunks: (kernel (h, V), (hidden
    (num_chunks, G, C, h), targets (num_chunks, G, C), weights (num_chunks, G, C)))."""
    chunks = tuple(_to_chunks(x, layout) for x in (hidden.astype(layout.compute_dtype), targets, weights))
    return kernel.astype(layout.compute_dtype), chunks


def _matmul(
    a: jax.Array,
    b: jax.Array,
    contract: tuple[int, int],
    batch: tuple[tuple[int, ...], tuple[int, ...]],
    accumulation: Any,
) -> jax.Array:
    dimensions = (((contract[0],), (contract[1],)), batch)
    return jax.lax.dot_general(a, b, dimensions, preferred_element_type=accumulation)


def _chunk_logits(hidden_c: jax.Array, kernel: jax.Array, logits_dtype: Any) -> jax.Array:
    """(G, C, h) @ (h, V) -> (G, C, V) logits in ``logits_dtype`` (accumulated in float32 or wider)."""
    return _matmul(hidden_c, kernel, (2, 0), ((), ()), logits_dtype)


def _softmax_statistics(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(..., V) -> (max, first argmax, sum of exp(logits - max)), each (...): an argmax reduction, then a sum of exp
    (two reads of the logits, one exponential per element; a single variadic (max, sum, argmax) reduction was
    measured no faster on the H200 and 1.5-3x slower on CPU, RESULTS.md session 6)."""
    best = jnp.argmax(logits, axis=-1)
    top = jnp.take_along_axis(logits, best[..., None], axis=-1)  # the max, read at the argmax
    return top[..., 0], best, jnp.sum(jnp.exp(logits - top), axis=-1)


def _token_statistics(logits: jax.Array, targets_c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(G, C, V) logits -> (logsumexp (G, C), nll (G, C), argmax == target (G, C) bool)."""
    top, best, total = _softmax_statistics(logits)
    logsumexp = top + jnp.log(total)
    target_logit = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
    return logsumexp, logsumexp - target_logit, best == targets_c


def chunk_loss_terms(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    statistics: str,
    d_dtype: Any,
    with_gradient: bool,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One chunk's cross-entropy terms from its logits, computed as ``statistics`` says (:data:`STATISTICS`).

    Args:
        logits: (..., V) float logits (float32 from the head's matmul, or its ``logits_dtype``); the statistics
            run in ``promote_types(float32, logits dtype)``.
        targets: (...) int32 target ids.
        weights: (...) token weights (scale ``d logits``).
        statistics: "two_pass" (jnp) or "pallas_gpu" (:func:`pallas_kernels.gpu.softmax_xent.softmax_cross_entropy`).
        d_dtype: dtype of ``d logits`` (the compute dtype).
        with_gradient: also return ``d logits``; False reads the logits for the statistics only.
        interpret: run the "pallas_gpu" kernel in Pallas interpret mode.

    Returns:
        (nll (...), argmax == target (...) bool, d logits = (softmax - onehot(target)) * weight (..., V) in
        ``d_dtype``, or None without ``with_gradient``).
    """
    if statistics == "pallas_gpu":
        from pallas_kernels.gpu.softmax_xent import softmax_cross_entropy  # Pallas-Triton: loaded only when used

        fused = softmax_cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            weights.reshape(-1),
            d_dtype=d_dtype,
            with_gradient=with_gradient,
            interpret=interpret,
        )
        d_logits = None if fused.d_logits is None else fused.d_logits.reshape(logits.shape)
        return fused.nll.reshape(targets.shape), fused.argmax.reshape(targets.shape) == targets, d_logits
    logits = logits.astype(jnp.promote_types(jnp.float32, logits.dtype))  # read in its dtype, computed in float32
    logsumexp, nll, hits = _token_statistics(logits, targets)
    if not with_gradient:
        return nll, hits, None
    onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    d_logits = (jnp.exp(logits - logsumexp[..., None]) - onehot) * weights[..., None]
    return nll, hits, d_logits.astype(d_dtype)


def _chunk_terms(
    layout: _Layout, logits: jax.Array, targets_c: jax.Array, weights_c: jax.Array, with_gradient: bool
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """:func:`chunk_loss_terms` of (G, C, V) logits with the layout's statistics and compute dtype ("one_read"
    without the gradient is "pallas_gpu": the same single read of the kernel)."""
    return chunk_loss_terms(
        logits,
        targets_c,
        weights_c,
        statistics="pallas_gpu" if layout.statistics == "one_read" else layout.statistics,
        d_dtype=layout.compute_dtype,
        with_gradient=with_gradient,
        interpret=layout.interpret,
    )


def _chunk_step(
    layout: _Layout,
    kernel_c: jax.Array,
    hidden_c: jax.Array,
    targets_c: jax.Array,
    weights_c: jax.Array,
    *,
    with_gradient: bool,
) -> ChunkResult:
    """One chunk: (nll (G, C), argmax == target (G, C), with the gradient of ``sum w * nll`` (d hidden (G, C, h) in
    the accumulation dtype, and a function adding the chunk's d kernel to the running (G, h, V) sum: written as
    ``sum + GEMM`` so that XLA can accumulate in the GEMM's output), else None, and () bool: whether that gradient
    is valid; False only for a chunk of :data:`EXP_STATISTICS` whose exp(logits - target logit) may overflow
    (:func:`exp_headroom`))."""
    if layout.statistics == "fused_matmul":
        return _fused_matmul_step(layout, kernel_c, hidden_c, targets_c, weights_c, with_gradient)
    logits = _chunk_logits(hidden_c, kernel_c, layout.logits_dtype)
    if layout.statistics == "one_read" and with_gradient:
        return _one_read_step(layout, logits, kernel_c, hidden_c, targets_c, weights_c)
    nll, hits, d_logits = _chunk_terms(layout, logits, targets_c, weights_c, with_gradient)
    if d_logits is None:
        return nll, hits, None, jnp.bool_(True)
    d_hidden, d_kernel_c = _logits_gradients(d_logits, hidden_c, kernel_c)
    return nll, hits, (d_hidden, lambda d_kernel: d_kernel + d_kernel_c), jnp.bool_(True)


def _logits_gradients(d_logits: jax.Array, hidden_c: jax.Array, kernel_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(G, C, V) d logits -> (d hidden (G, C, h) = d logits @ kernel.T, d kernel (G, h, V) = hidden.T @ d logits)."""
    accumulation = jnp.promote_types(jnp.float32, d_logits.dtype)
    return (
        _matmul(d_logits, kernel_c, (2, 1), ((), ()), accumulation),
        _matmul(hidden_c, d_logits, (1, 1), ((0,), (0,)), accumulation),
    )


def exp_headroom(dtype: Any, vocab_size: int) -> float:
    """How far (in logits) a row's maximum may lie above its target logit for E = exp(logits - target logit)
    (:data:`EXP_STATISTICS`) to stay finite in ``dtype`` and the gradient GEMM summing V of them (times kernel
    entries up to e^8 ~ 3000) not to overflow: log(dtype max) - log(V) - 8 (69.2 for bfloat16 / float32 at
    V = 100352)."""
    return math.log(float(jnp.finfo(dtype).max)) - math.log(vocab_size) - 8.0


class _TargetColumns(NamedTuple):
    """Each row's target column of the kernel and target logit: the reference of E."""

    columns: jax.Array  # (h, R) kernel[:, t_r] in the compute dtype
    logits: jax.Array  # (R,) hidden_r . kernel[:, t_r] in the accumulation dtype


def _target_columns(
    layout: _Layout, kernel_c: jax.Array, hidden_flat: jax.Array, targets_flat: jax.Array
) -> _TargetColumns:
    """(R, h) hidden and (R,) targets -> :class:`_TargetColumns` (a gather of R columns and R dot products)."""
    accumulation = jnp.promote_types(jnp.float32, layout.compute_dtype)
    precision = jax.lax.Precision.HIGHEST if layout.compute_dtype == jnp.float32 else None
    columns = jnp.take(kernel_c, targets_flat, axis=1)
    logits = jnp.einsum("rh,hr->r", hidden_flat, columns, precision=precision, preferred_element_type=accumulation)
    return _TargetColumns(columns, logits)


def _row_scaled_gradients(
    layout: _Layout, kernel_c: jax.Array, hidden_c: jax.Array, scale: jax.Array, unscaled: jax.Array
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """The chunk's gradients for ``d logits = scale[:, None] * unscaled``, unscaled (G, C, V) in the compute dtype
    and scale (R,) in the accumulation dtype: (d hidden (G, C, h) = scale (unscaled @ kernel.T), the function adding
    d kernel = (scale hidden).T @ unscaled to the running sum). The GEMMs read ``unscaled`` as it is."""
    groups, chunk, width = hidden_c.shape
    accumulation = jnp.promote_types(jnp.float32, layout.compute_dtype)
    d_hidden = _matmul(unscaled, kernel_c, (2, 1), ((), ()), accumulation) * scale.reshape(groups, chunk, 1)
    scaled_hidden = (scale[:, None] * hidden_c.reshape(-1, width)).astype(layout.compute_dtype)
    scaled_hidden = scaled_hidden.reshape(hidden_c.shape)

    def accumulate(d_kernel: jax.Array) -> jax.Array:
        return d_kernel + _matmul(scaled_hidden, unscaled, (1, 1), ((0,), (0,)), accumulation)

    return d_hidden, accumulate


def _fits(layout: _Layout, vocab: int, row_max: jax.Array, target_logits: jax.Array) -> jax.Array:
    """() bool: no row's maximum exceeds its target logit c by more than :func:`exp_headroom` (E = exp(logits -
    c) finite, and its sums)."""
    return jnp.all(row_max - target_logits <= exp_headroom(layout.compute_dtype, vocab))


def _one_read_step(
    layout: _Layout,
    logits: jax.Array,
    kernel_c: jax.Array,
    hidden_c: jax.Array,
    targets_c: jax.Array,
    weights_c: jax.Array,
) -> ChunkResult:
    """:func:`_chunk_step` with the gradient for "one_read": the one-read kernel
    (:func:`pallas_kernels.gpu.softmax_xent.softmax_cross_entropy` with a reference) reads the chunk's (G, C, V)
    logits once and writes D = exp(logits - c) - exp(logsumexp - c) onehot(t), c the target logit computed here
    (its only use: D's reference); d logits = a D with a = w exp(c - logsumexp), so the gradient GEMMs read D with
    a row scale (:func:`_row_scaled_gradients`). The nll and hits come from the logits as read (the rounded ones
    for a lower ``logits_dtype``); they and the gradient are valid when the chunk :func:`_fits`."""
    from pallas_kernels.gpu.softmax_xent import softmax_cross_entropy  # Pallas-Triton: loaded only when used

    vocab = logits.shape[-1]
    hidden_flat, targets_flat = hidden_c.reshape(-1, hidden_c.shape[-1]), targets_c.reshape(-1)
    target = _target_columns(layout, kernel_c, hidden_flat, targets_flat)
    fused = softmax_cross_entropy(
        logits.reshape(-1, vocab),
        targets_flat,
        weights_c.reshape(-1),
        d_dtype=layout.compute_dtype,
        reference=target.logits,
        interpret=layout.interpret,
    )
    scale = weights_c.reshape(-1) * jnp.exp(target.logits - fused.logsumexp)  # (R,) a
    gradient = _row_scaled_gradients(layout, kernel_c, hidden_c, scale, fused.unscaled_d_logits.reshape(logits.shape))
    nll, hits = fused.nll.reshape(targets_c.shape), (fused.argmax == targets_flat).reshape(targets_c.shape)
    return nll, hits, gradient, _fits(layout, vocab, fused.max, target.logits)


def _fused_matmul_step(
    layout: _Layout,
    kernel_c: jax.Array,
    hidden_c: jax.Array,
    targets_c: jax.Array,
    weights_c: jax.Array,
    with_gradient: bool,
) -> ChunkResult:
    """:func:`_chunk_step` with the logits GEMM fused with the statistics
    (:mod:`pallas_kernels.gpu.logits_softmax_tiles`): no logits in memory.

    With the target logit c as reference the kernel writes E = exp(logits - c) in the compute dtype. With
    a = w exp(c - logsumexp) (= w / sum E), ``d logits = a E - w onehot(t)``, so
    ``d hidden = a (E @ kernel.T) - w kernel[:, t].T`` and ``d kernel = (a hidden).T @ E`` minus ``w hidden`` added
    into column t: the gradient GEMMs read E as it is (:func:`_row_scaled_gradients`), the one-hot part is a gather
    and a scatter of (C, h). The gradient is valid when the chunk :func:`_fits`.
    """
    from pallas_kernels.gpu.logits_softmax_tiles import combine_tiles, logits_softmax_tiles  # Pallas-Triton

    groups, chunk, width = hidden_c.shape
    hidden_flat, targets_flat, weights_flat = hidden_c.reshape(-1, width), targets_c.reshape(-1), weights_c.reshape(-1)
    target = _target_columns(layout, kernel_c, hidden_flat, targets_flat)
    tiles = logits_softmax_tiles(
        hidden_flat,
        kernel_c,
        target.logits,
        with_exp=with_gradient,
        config=layout.tiles_config,
        interpret=layout.interpret,
    )
    stats = combine_tiles(tiles)
    nll = (stats.logsumexp - target.logits).reshape(groups, chunk)
    hits = (stats.argmax == targets_flat).reshape(groups, chunk)
    if not with_gradient:
        return nll, hits, None, jnp.bool_(True)
    accumulation = jnp.promote_types(jnp.float32, layout.compute_dtype)
    scale = weights_flat * jnp.exp(target.logits - stats.logsumexp)  # (R,) a
    exp_logits = tiles.exp_logits.reshape(groups, chunk, -1)
    d_hidden, accumulate_exp = _row_scaled_gradients(layout, kernel_c, hidden_c, scale, exp_logits)
    d_hidden = d_hidden - (weights_flat[:, None] * target.columns.T.astype(accumulation)).reshape(d_hidden.shape)
    group_ids = jnp.repeat(jnp.arange(groups), chunk)
    one_hot_part = -(weights_flat[:, None] * hidden_flat.astype(accumulation))  # (R, h) into columns t_r

    def accumulate(d_kernel: jax.Array) -> jax.Array:
        d_kernel = d_kernel.at[group_ids, :, targets_flat].add(one_hot_part)  # in place on the running sum
        return accumulate_exp(d_kernel)

    return nll, hits, (d_hidden, accumulate), _fits(layout, kernel_c.shape[1], stats.max, target.logits)


def _outputs(nll: jax.Array, hits: jax.Array, weights: jax.Array) -> LMHeadLoss:
    """Per-token (N,) nll, hits and weights -> :class:`LMHeadLoss`."""
    return LMHeadLoss(nll_sum=jnp.sum(nll * weights), weight_sum=jnp.sum(weights), correct=jnp.where(hits, weights, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(layout: _Layout, hidden, kernel, targets, weights) -> LMHeadLoss:
    """Loss only: one scan over the chunks computing logits, logsumexp and hits."""
    kernel_c, (hidden_chunks, target_chunks, weight_chunks) = _chunk_inputs(layout, hidden, kernel, targets, weights)

    def step(_, xs):
        nll, hits, _, _ = _chunk_step(layout, kernel_c, *xs, with_gradient=False)
        return None, (nll, hits)

    _, (nll, hits) = jax.lax.scan(step, None, (hidden_chunks, target_chunks, weight_chunks))
    num_tokens = hidden.shape[0]
    return _outputs(_from_chunks(nll, num_tokens), _from_chunks(hits, num_tokens), weights)


def _loss_and_gradients(
    layout: _Layout, hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The chunk loop with gradients: per token (nll (N,), hits (N,), d hidden (N, h)), d kernel (h, V) summed
    over chunks and groups (the accumulation dtype), and () bool: every chunk's gradient valid."""
    kernel_c, chunks = _chunk_inputs(layout, hidden, kernel, targets, weights)
    accumulation = jnp.promote_types(jnp.float32, layout.compute_dtype)

    def step(d_kernel, xs):
        nll, hits, (d_hidden_c, accumulate), valid = _chunk_step(layout, kernel_c, *xs, with_gradient=True)
        return accumulate(d_kernel), (nll, hits, d_hidden_c, valid)

    zeros = jnp.zeros((layout.groups,) + kernel_c.shape, dtype=accumulation)
    d_kernel, (nll, hits, d_hidden, valid) = jax.lax.scan(step, zeros, chunks)
    num_tokens = hidden.shape[0]
    per_token = tuple(_from_chunks(x, num_tokens) for x in (nll, hits, d_hidden))
    return per_token + (jnp.sum(d_kernel, axis=0), jnp.all(valid))


def _fallback_layout(layout: _Layout, num_tokens: int, vocab: int) -> _Layout:
    """The layout that recomputes a call of :data:`EXP_STATISTICS` that does not fit: "two_pass" in a quarter of
    its default chunk (at most the call's own). The fallback is rare (a logit more than ~69 above the target's), and
    XLA allocates its buffers beside the main path's (session 13: "fused_matmul" at 4096-token chunks held 2.6 GiB,
    its E 0.8 of them), so it is kept small: ~0.6 GiB at 1024 tokens x 100352 in bfloat16."""
    group_tokens = math.ceil(num_tokens / layout.groups)
    logits_dtype = layout.logits_dtype if layout.statistics != "fused_matmul" else None
    own = default_num_chunks(group_tokens, vocab, "two_pass", layout.compute_dtype, logits_dtype)
    num_chunks = min(group_tokens, max(layout.num_chunks, 4 * own))
    return layout._replace(statistics="two_pass", num_chunks=num_chunks, chunk=math.ceil(group_tokens / num_chunks))


def _chunked_loss_forward(layout: _Layout, hidden, kernel, targets, weights):
    """Loss and, chunk by chunk, the gradients of ``nll_sum`` wrt hidden and kernel (the residuals). With
    :data:`EXP_STATISTICS`, when any chunk does not fit (:func:`_fits`: exp(logits - target logit) could
    overflow), the whole call is computed again with "two_pass" (:func:`_fallback_layout`; one ``lax.cond`` per
    call, outside the chunk loop; "one_read"'s loss is then not valid either)."""
    results = _loss_and_gradients(layout, hidden, kernel, targets, weights)
    if layout.statistics in EXP_STATISTICS:
        fallback = _fallback_layout(layout, hidden.shape[0], kernel.shape[1])
        results = jax.lax.cond(
            results[-1], lambda: results, lambda: _loss_and_gradients(fallback, hidden, kernel, targets, weights)
        )
    nll, hits, d_hidden, d_kernel, _ = results
    return _outputs(nll, hits, weights), (d_hidden, d_kernel, nll, hits)


def _chunked_loss_backward(layout: _Layout, residuals, cotangent: LMHeadLoss):
    """Scales the stored gradients by the cotangent of ``nll_sum``; weights get ``d nll_sum / d w_i = nll_i``,
    ``d weight_sum / d w_i = 1`` and ``d correct_i / d w_i = hit_i``."""
    d_hidden, d_kernel, nll, hits = residuals
    scale = cotangent.nll_sum.astype(d_kernel.dtype)
    d_weights = scale * nll + cotangent.weight_sum + jnp.where(hits, cotangent.correct, 0)
    return (
        (scale * d_hidden).astype(layout.hidden_dtype),
        (scale * d_kernel).astype(layout.kernel_dtype),
        None,
        d_weights,
    )


_chunked_loss.defvjp(_chunked_loss_forward, _chunked_loss_backward)
