"""Softmax cross-entropy statistics and the logits' gradient of one chunk of LM-head logits, fused for NVIDIA GPUs
(Pallas, Triton lowering).

For logits x (R, V) (float32, or the compute dtype: bfloat16 logits are read as they are and every statistic is
computed in float32), int32 targets t (R,) and float32 weights w (R,), per row r:

    logsumexp_r = log sum_v exp(x_rv)
    nll_r       = logsumexp_r - x_r,t_r
    argmax_r    = the first v with x_rv = max_v x_rv                         (ties -> the smallest index)
    d_r         = (exp(x_r - logsumexp_r) - onehot(t_r)) * w_r              (cast to the compute dtype)

One program owns ``block_rows`` rows and walks the vocabulary in blocks of ``block_v`` columns. Pass 1 keeps a
running (max, sum of exp relative to that max, first argmax, target logit) per row: one read of the logits.
Pass 2 (only when the gradient is asked for) reads the logits again, last block first (those pass 1 read last may
still sit in L2), and writes d. Compared with the jnp version (an argmax pass, a sum-of-exp pass, then a pass
reading the logits and writing d) the gradient costs two reads and one compute-dtype write per element instead of
three reads, and the statistics alone one read instead of two. Neither R nor V needs to be a multiple of the
blocks: loads and stores are masked.

With a per-row ``reference`` c (R,) known before the logits are read (the LM head's target logit, a cheap
gather-dot), pass 1 also writes, block by block as it reads them,

    exp_logits_r = exp(x_r - c_r)                                            (in the compute dtype)

and there is no pass 2: one read and one write per element. The gradient is then d_r = a_r exp_logits_r -
w_r onehot(t_r) with a_r = w_r exp(c_r - logsumexp_r), which the caller folds into its gradient GEMMs. Each
element's exponential is taken once, relative to the running max m (it feeds the sum), and scaled by
exp(m - c_r); exp_logits overflows when a row's maximum exceeds c_r by more than the dtype's log range (~88 for
bfloat16 / float32), which the caller checks with the returned ``max``.

Checked without a GPU (session 8): the Triton IR this lowers to compiles with triton 3.6 for sm_90 with no
register spills at 1-16 rows x 1024-4096 columns (78 registers at 2 x 2048, 4 warps); loads are 16-byte vectors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class SoftmaxXentConfig:
    """Launch parameters: rows per program, vocabulary columns per loop step, Triton warps and pipeline stages."""

    block_rows: int = 8
    block_v: int = 2048
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_v", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("block_rows", "block_v"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name}: expected a power of two, got {value}")

    def compiler_params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# Programs to aim for: memory-bound streaming wants several programs per SM (132 SMs on the H200).
TARGET_PROGRAMS = 1024


def default_config(rows: int, vocab: int) -> SoftmaxXentConfig:
    """The launch parameters for (rows, vocab) logits: at a 2048-token chunk of vocabulary 100352 the fastest of
    the H200 sweep (2026-12-04, ``python -m m2rnn_jax.bench.loss --kernel-configs ...``: 0.60 ms with the gradient,
    tied with 1 x 4096 columns; 8-16 rows per program 0.82-0.83 ms; docs/lm_head_loss_and_remat.md).

    Rows per program: the largest power of two <= 8 that still gives :data:`TARGET_PROGRAMS` programs (at least 1;
    a chunk of 2048 tokens gets 2 rows per program). Columns per step: 2048 (the next power of two of ``vocab`` when
    smaller). Warps: 8 for tiles above 4096 elements, else 4 (8-16 float32 elements per thread and tensor)."""
    block_rows = 8
    while block_rows > 1 and -(-rows // block_rows) < TARGET_PROGRAMS:
        block_rows //= 2
    block_rows = min(block_rows, _next_power_of_two(rows))
    block_v = min(2048, _next_power_of_two(vocab))
    return SoftmaxXentConfig(block_rows=block_rows, block_v=block_v, num_warps=8 if block_rows * block_v > 4096 else 4)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SoftmaxXent(NamedTuple):
    """What :func:`softmax_cross_entropy` returns.

    Attributes:
        logsumexp: (R,) in ``promote_types(float32, logits dtype)``.
        nll: (R,) ``logsumexp - logits[target]`` in that dtype.
        argmax: (R,) int32, the first index of the row maximum.
        max: (R,) the row maximum, in the statistics' dtype.
        d_logits: (R, V) ``(softmax - onehot(target)) * weight`` in the requested dtype; None when not asked for
            or with a ``reference``.
        exp_logits: (R, V) ``exp(logits - reference)`` in the requested dtype with a ``reference`` and the
            gradient, else None.
    """

    logsumexp: jax.Array
    nll: jax.Array
    argmax: jax.Array
    max: jax.Array
    d_logits: jax.Array | None
    exp_logits: jax.Array | None


def _kernel(
    logits_ref,
    targets_ref,
    weights_ref,
    *refs,
    rows: int,
    vocab: int,
    block_rows: int,
    block_v: int,
    with_reference: bool,
    with_gradient: bool,
):
    reference_ref = refs[0] if with_reference else None
    logsumexp_ref, nll_ref, argmax_ref, max_ref = refs[with_reference : with_reference + 4]
    out_ref = refs[with_reference + 4] if with_gradient else None  # d_logits, or exp_logits with a reference
    dtype = jnp.promote_types(jnp.float32, logits_ref.dtype)  # the statistics' dtype
    first_row = pl.program_id(0) * block_rows
    row_ids = first_row + jnp.arange(block_rows, dtype=jnp.int32)
    row_ok = row_ids < rows
    row_slice = pl.ds(first_row, block_rows)
    targets = pltriton.load(targets_ref.at[row_slice], mask=row_ok, other=0)
    num_blocks = pl.cdiv(vocab, block_v)
    writes_exp = with_reference and with_gradient
    if writes_exp:
        reference = pltriton.load(reference_ref.at[row_slice], mask=row_ok, other=0).astype(dtype)

    def load_block(j):
        cols = j * block_v + jnp.arange(block_v, dtype=jnp.int32)
        mask = row_ok[:, None] & (cols < vocab)[None, :]
        x = pltriton.load(logits_ref.at[row_slice, pl.ds(j * block_v, block_v)], mask=mask, other=-jnp.inf)
        return cols, mask, x.astype(dtype)

    def statistics(j, carry):
        j = jnp.asarray(j, jnp.int32)  # the row index's type, also with x64 enabled (float64 tests)
        top, total, best, target_logit = carry
        cols, mask, x = load_block(j)
        block_top = jnp.max(x, axis=1)
        block_best = jnp.min(jnp.where(x == block_top[:, None], cols[None, :], vocab), axis=1)
        new_top = jnp.maximum(top, block_top)
        relative = jnp.exp(x - new_top[:, None])
        total = total * jnp.exp(top - new_top) + jnp.sum(relative, axis=1)
        best = jnp.where(block_top > top, block_best, best)  # strict: an equal later maximum keeps the first index
        target_logit = target_logit + jnp.sum(jnp.where(cols[None, :] == targets[:, None], x, 0), axis=1)
        if writes_exp:  # exp(x - c) = exp(x - m) exp(m - c): the one exponential per element, rescaled
            exp_logits = relative * jnp.exp(new_top - reference)[:, None]
            pltriton.store(
                out_ref.at[row_slice, pl.ds(j * block_v, block_v)], exp_logits.astype(out_ref.dtype), mask=mask
            )
        return new_top, total, best, target_logit

    # Rows past R start their running max at 0 instead of -inf so that they stay finite (they are never stored);
    # a real row's first block holds column 0, so its max is finite after one step.
    init = (
        jnp.where(row_ok, -jnp.inf, 0).astype(dtype),
        jnp.zeros((block_rows,), dtype),
        jnp.zeros((block_rows,), jnp.int32),
        jnp.zeros((block_rows,), dtype),
    )
    top, total, best, target_logit = lax.fori_loop(0, num_blocks, statistics, init)
    logsumexp = top + jnp.log(total)
    pltriton.store(logsumexp_ref.at[row_slice], logsumexp, mask=row_ok)
    pltriton.store(nll_ref.at[row_slice], logsumexp - target_logit, mask=row_ok)
    pltriton.store(argmax_ref.at[row_slice], best, mask=row_ok)
    pltriton.store(max_ref.at[row_slice], top, mask=row_ok)
    if not with_gradient or writes_exp:
        return
    weights = pltriton.load(weights_ref.at[row_slice], mask=row_ok, other=0).astype(dtype)

    def gradient(i, _):
        j = jnp.asarray(num_blocks - 1 - i, jnp.int32)  # backwards: the blocks pass 1 read last may still be in L2
        cols, mask, x = load_block(j)
        onehot = (cols[None, :] == targets[:, None]).astype(dtype)
        d = (jnp.exp(x - logsumexp[:, None]) - onehot) * weights[:, None]
        pltriton.store(out_ref.at[row_slice, pl.ds(j * block_v, block_v)], d.astype(out_ref.dtype), mask=mask)
        return 0

    lax.fori_loop(0, num_blocks, gradient, 0)


def softmax_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    d_dtype: Any = None,
    with_gradient: bool = True,
    reference: jax.Array | None = None,
    config: SoftmaxXentConfig | None = None,
    interpret: bool = False,
) -> SoftmaxXent:
    """Per-row softmax cross-entropy statistics of ``logits`` and, optionally, its weighted gradient.

    Args:
        logits: (R, V) float logits (float32, or bfloat16 / float16 read as they are with float32 statistics, on
            GPUs; float64 runs in interpret mode).
        targets: (R,) int target ids in [0, V) (not checked: an id outside gives nll = logsumexp, no onehot).
        weights: (R,) token weights scaling the rows of d_logits.
        d_dtype: dtype of d_logits / exp_logits; default the logits' dtype.
        with_gradient: False computes only the statistics (one read of the logits, ``d_logits`` None).
        reference: optional (R,) float per-row reference c: with the gradient, write ``exp_logits = exp(logits -
            c)`` in the statistics' single read instead of ``d_logits`` (the module docstring).
        config: launch parameters; default :func:`default_config`.
        interpret: run the kernel in Pallas interpret mode (any backend, for tests).

    Returns:
        :class:`SoftmaxXent`.

    Raises:
        ValueError: on shapes that do not fit together or a non-float ``logits``.
    """
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits: expected shape (R, V) with R, V >= 1, got {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits: expected a float dtype, got {logits.dtype}")
    rows, vocab = logits.shape
    if targets.shape != (rows,) or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets: expected an int array of shape ({rows},), got {targets.dtype} {targets.shape}")
    if weights.shape != (rows,):
        raise ValueError(f"weights: expected shape ({rows},), got {weights.shape}")
    if reference is not None and (reference.shape != (rows,) or not jnp.issubdtype(reference.dtype, jnp.floating)):
        raise ValueError(
            f"reference: expected a float array of shape ({rows},), got {reference.dtype} {reference.shape}"
        )
    config = default_config(rows, vocab) if config is None else config
    dtype = jnp.promote_types(jnp.float32, logits.dtype)
    out_shape = [jax.ShapeDtypeStruct((rows,), dtype) for _ in range(2)]
    out_shape += [jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), dtype)]
    if with_gradient:
        out_shape.append(jax.ShapeDtypeStruct((rows, vocab), jnp.dtype(dtype if d_dtype is None else d_dtype)))
    inputs = [logits, targets.astype(jnp.int32), weights.astype(dtype)]
    if reference is not None:
        inputs.append(reference.astype(dtype))
    kernel = functools.partial(
        _kernel,
        rows=rows,
        vocab=vocab,
        block_rows=config.block_rows,
        block_v=config.block_v,
        with_reference=reference is not None,
        with_gradient=with_gradient,
    )
    writes_exp = with_gradient and reference is not None
    name = "softmax_cross_entropy" + ("_and_exp" if writes_exp else "_and_gradient" if with_gradient else "")
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(rows, config.block_rows),),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name=name,
    )(*inputs)
    gradient = outputs[4] if with_gradient else None
    return SoftmaxXent(
        *outputs[:4], d_logits=None if writes_exp else gradient, exp_logits=gradient if writes_exp else None
    )
