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

One read (a per-row ``reference`` c (R,) known before the logits are read: the LM head's target logit, a cheap
gather-dot): a second kernel writes, block by block as it reads them,

    D_r = exp(x_r - c_r) - exp(logsumexp_r - c_r) onehot(t_r)                 (in the compute dtype)

which is d_r / a_r with a_r = w_r exp(c_r - logsumexp_r): the caller's gradient GEMMs read D and scale rows by a.
There is no running maximum: each lane (element of the (block_rows, block_v) tile) keeps its own running sum of
exp(x - c), maximum and first argmax, and the lanes are reduced once, after the loop (logsumexp = c + log(sum));
the target logit is one gathered load per row, and the target column is written again after the loop and a
barrier (exp(logsumexp - c) is the sum itself). Per element that is one FMA and the hardware ex2, an add, a
compare-select and a max: 9.2 SASS instructions per logit against the two-pass kernel's 35.8 (compiled for sm_90 on
the CPU, ``python -m experiments.bench.softmax_xent_sass``, RESULTS.md session 17), so it should run at the memory's
speed. Without the maximum the sum overflows when
a row's maximum exceeds c by more than float32's log range (~88); the caller checks the returned ``max`` and
recomputes such calls another way.

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

from pallas_kernels.gpu import fast_math


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


def default_one_read_config(vocab: int) -> SoftmaxXentConfig:
    """The one-read kernel's launch parameters: one row per program, 2048 columns per step (the next power of two of
    ``vocab`` when smaller), 4 warps: 16 elements per thread and tensor. Chosen without a GPU (session 17) by its
    SASS for sm_90 at 4096 x 100352 bfloat16 logits (``triton.compile`` on the CPU): 9.2 instructions per element
    and 90 registers, against 9.2-9.7 and 96-174 registers at 2-8 rows x 1024-2048 columns x 4-8 warps; the
    fewest registers leave the most warps in flight for a kernel that streams memory. Not timed yet."""
    return SoftmaxXentConfig(block_rows=1, block_v=min(2048, _next_power_of_two(vocab)), num_warps=4)


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
        unscaled_d_logits: (R, V) with a ``reference`` c and the gradient, D = ``exp(logits - c) - exp(logsumexp -
            c) onehot(target)`` in the requested dtype: ``d_logits = w exp(c - logsumexp) D``; else None.
    """

    logsumexp: jax.Array
    nll: jax.Array
    argmax: jax.Array
    max: jax.Array
    d_logits: jax.Array | None
    unscaled_d_logits: jax.Array | None


def _kernel(
    logits_ref,
    targets_ref,
    weights_ref,
    *out_refs,
    rows: int,
    vocab: int,
    block_rows: int,
    block_v: int,
):
    """The two-pass kernel (the module docstring): statistics, then (with an output for it) d_logits."""
    logsumexp_ref, nll_ref, argmax_ref, max_ref = out_refs[:4]
    d_ref = out_refs[4] if len(out_refs) == 5 else None
    dtype = jnp.promote_types(jnp.float32, logits_ref.dtype)  # the statistics' dtype
    first_row = pl.program_id(0) * block_rows
    row_ids = first_row + jnp.arange(block_rows, dtype=jnp.int32)
    row_ok = row_ids < rows
    row_slice = pl.ds(first_row, block_rows)
    targets = pltriton.load(targets_ref.at[row_slice], mask=row_ok, other=0)
    num_blocks = pl.cdiv(vocab, block_v)

    def load_block(j):
        cols = j * block_v + jnp.arange(block_v, dtype=jnp.int32)
        mask = row_ok[:, None] & (cols < vocab)[None, :]
        x = pltriton.load(logits_ref.at[row_slice, pl.ds(j * block_v, block_v)], mask=mask, other=-jnp.inf)
        return cols, mask, x.astype(dtype)

    def statistics(j, carry):
        j = jnp.asarray(j, jnp.int32)  # the row index's type, also with x64 enabled (float64 tests)
        top, total, best, target_logit = carry
        cols, _, x = load_block(j)
        block_top = jnp.max(x, axis=1)
        block_best = jnp.min(jnp.where(x == block_top[:, None], cols[None, :], vocab), axis=1)
        new_top = jnp.maximum(top, block_top)
        total = total * jnp.exp(top - new_top) + jnp.sum(fast_math.exp(x - new_top[:, None]), axis=1)
        best = jnp.where(block_top > top, block_best, best)  # strict: an equal later maximum keeps the first index
        target_logit = target_logit + jnp.sum(jnp.where(cols[None, :] == targets[:, None], x, 0), axis=1)
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
    if d_ref is None:
        return
    weights = pltriton.load(weights_ref.at[row_slice], mask=row_ok, other=0).astype(dtype)

    def gradient(i, _):
        j = jnp.asarray(num_blocks - 1 - i, jnp.int32)  # backwards: the blocks pass 1 read last may still be in L2
        cols, mask, x = load_block(j)
        onehot = (cols[None, :] == targets[:, None]).astype(dtype)
        d = (fast_math.exp(x - logsumexp[:, None]) - onehot) * weights[:, None]
        pltriton.store(d_ref.at[row_slice, pl.ds(j * block_v, block_v)], d.astype(d_ref.dtype), mask=mask)
        return 0

    lax.fori_loop(0, num_blocks, gradient, 0)


def _one_read_kernel(
    logits_ref,
    targets_ref,
    reference_ref,
    logsumexp_ref,
    nll_ref,
    argmax_ref,
    max_ref,
    out_ref,
    *,
    rows: int,
    vocab: int,
    block_rows: int,
    block_v: int,
    barrier: bool,
):
    """The one-read kernel (the module docstring): per-lane running sums of exp(x - c), maxima and first argmaxes,
    reduced across lanes once after the loop; D = exp(x - c) written as the blocks are read (whole vectors, no
    per-element mask), then, after a barrier, the target column's final value."""
    dtype = jnp.promote_types(jnp.float32, logits_ref.dtype)
    first_row = pl.program_id(0) * block_rows
    row_ids = first_row + jnp.arange(block_rows, dtype=jnp.int32)
    row_slice = pl.ds(first_row, block_rows)
    # Masks only where a block can overhang (statically known): every other compare costs issue slots per element.
    row_ok = row_ids < rows if rows % block_rows else None
    ragged_vocab = vocab % block_v != 0

    def load_rows(ref):  # (block_rows,) of a per-row input, 0 past R
        return pltriton.load(ref) if row_ok is None else pltriton.load(ref, mask=row_ok, other=0)

    targets = load_rows(targets_ref.at[row_slice])
    reference = load_rows(reference_ref.at[row_slice]).astype(dtype)
    target_logit = load_rows(logits_ref.at[row_ids, targets]).astype(dtype)  # one gathered element per row
    scaled_reference = reference * fast_math.LOG2_E

    def step(j, carry):
        j = jnp.asarray(j, jnp.int32)  # the row index's type, also with x64 enabled (float64 tests)
        total, top, best = carry
        cols = j * block_v + jnp.arange(block_v, dtype=jnp.int32)
        mask = None if row_ok is None else jnp.broadcast_to(row_ok[:, None], (block_rows, block_v))
        if ragged_vocab:
            col_ok = jnp.broadcast_to((cols < vocab)[None, :], (block_rows, block_v))
            mask = col_ok if mask is None else mask & col_ok
        columns = pl.ds(j * block_v, block_v)
        block = logits_ref.at[row_slice, columns]
        x = (pltriton.load(block) if mask is None else pltriton.load(block, mask=mask, other=-jnp.inf)).astype(dtype)
        exp_logits = jnp.exp2(x * fast_math.LOG2_E - scaled_reference[:, None])  # one FMA and the hardware ex2
        best = jnp.where(x > top, cols[None, :], best)  # strict: a lane keeps its first maximal column
        top = jnp.maximum(top, x)
        pltriton.store(out_ref.at[row_slice, columns], exp_logits.astype(out_ref.dtype), mask=mask)
        return total + exp_logits, top, best

    lanes = (block_rows, block_v)
    init = (jnp.zeros(lanes, dtype), jnp.full(lanes, -jnp.inf, dtype), jnp.zeros(lanes, jnp.int32))
    total, top, best = lax.fori_loop(0, pl.cdiv(vocab, block_v), step, init)
    # Every thread's stores of the loop (the target column's exp(x_t - c) among them) are performed before any
    # thread stores the target column's final value below (bar.sync orders the CTA's global memory accesses).
    # Interpret mode runs one program at a time, in order, and has no barrier.
    if barrier:
        pltriton.debug_barrier()
    total = jnp.sum(total, axis=1)
    row_max = jnp.max(top, axis=1)
    argmax = jnp.min(jnp.where(top == row_max[:, None], best, vocab), axis=1)
    logsumexp = reference + jnp.log(total)
    pltriton.store(logsumexp_ref.at[row_slice], logsumexp, mask=row_ok)
    pltriton.store(nll_ref.at[row_slice], logsumexp - target_logit, mask=row_ok)
    pltriton.store(argmax_ref.at[row_slice], argmax, mask=row_ok)
    pltriton.store(max_ref.at[row_slice], row_max, mask=row_ok)
    # d / a at the target: exp(x_t - c) - exp(logsumexp - c), and exp(logsumexp - c) is the sum itself.
    target_value = jnp.exp(target_logit - reference) - total
    pltriton.store(out_ref.at[row_ids, targets], target_value.astype(out_ref.dtype), mask=row_ok)


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
        d_dtype: dtype of d_logits / unscaled_d_logits; default the logits' dtype.
        with_gradient: False computes only the statistics (one read of the logits, ``d_logits`` None).
        reference: optional (R,) float per-row reference c, near the target logit: with the gradient, run the
            one-read kernel, which writes ``unscaled_d_logits`` instead of ``d_logits`` (the module docstring;
            valid while no row's maximum exceeds c by more than ~88); when ``d_dtype`` is the logits' dtype it is
            written over the logits' buffer (``input_output_aliases``: XLA copies the logits first only where they
            are still needed after the call), so a chunk needs one (R, V) buffer, not two.
        config: launch parameters; default :func:`default_config` (:func:`default_one_read_config` for the
            one-read kernel).
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
    one_read = with_gradient and reference is not None
    if config is None:
        config = default_one_read_config(vocab) if one_read else default_config(rows, vocab)
    dtype = jnp.promote_types(jnp.float32, logits.dtype)
    out_shape = [jax.ShapeDtypeStruct((rows,), dtype) for _ in range(2)]
    out_shape += [jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), dtype)]
    if with_gradient:
        out_shape.append(jax.ShapeDtypeStruct((rows, vocab), jnp.dtype(dtype if d_dtype is None else d_dtype)))
    static = dict(rows=rows, vocab=vocab, block_rows=config.block_rows, block_v=config.block_v)
    aliases = {}
    if one_read and out_shape[4].dtype == logits.dtype:
        aliases = {0: 4}  # D overwrites the logits: each block is read before its D is stored, by its own program
    if one_read:
        kernel = functools.partial(_one_read_kernel, **static, barrier=not interpret)
        name = "softmax_cross_entropy_one_read"
        inputs = (logits, targets.astype(jnp.int32), reference.astype(dtype))
    else:
        kernel = functools.partial(_kernel, **static)
        name = "softmax_cross_entropy" + ("_and_gradient" if with_gradient else "")
        inputs = (logits, targets.astype(jnp.int32), weights.astype(dtype))
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(rows, config.block_rows),),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name=name,
        input_output_aliases=aliases,
    )(*inputs)
    gradient = outputs[4] if with_gradient else None
    return SoftmaxXent(
        *outputs[:4], d_logits=None if one_read else gradient, unscaled_d_logits=gradient if one_read else None
    )
