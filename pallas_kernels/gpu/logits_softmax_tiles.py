"""The LM head's logits GEMM with its softmax statistics in the epilogue, for NVIDIA GPUs (Pallas, Triton lowering):
the float32 logits are never written to memory.

For hidden states x (R, K), the head kernel W (K, V) (both in the compute dtype) and a per-row reference c (R,)
(float32; the chunked loss passes the target logit), program (i, j) computes the logits tile
L = x[rows i] @ W[:, cols j] (BM, BN) with a float32 accumulator and, from L alone, per row of the tile:

    tile_max     = max_v L_rv                      (columns past V count as -inf)
    tile_argmax  = the first v with L_rv = tile_max
    tile_sumexp  = sum_v exp(L_rv - tile_max)
    exp_logits   = exp(L_rv - c_r)                 (optional, stored in the compute dtype: (R, V))

The statistics of tile j go to column j of (T, R) arrays (T = ceil(V / BN)); combining T values per row is cheap
(:func:`combine_tiles`). ``exp_logits`` is what the loss's gradient needs: with S_r = exp(logsumexp_r - c_r),
softmax_r = exp_logits_r / S_r, so the logits gradient is one row scale of it (and a fix at the target column),
and the two gradient GEMMs read it in the compute dtype. Against a cuBLAS logits GEMM followed by statistics and
gradient kernels, this saves the float32 logits' write and two reads (per element 4 + 8 bytes of 14).
``exp_logits`` overflows when a row's logits exceed c_r by more than ~88 (float32 / bfloat16 range): callers check
max_v L_rv - c_r from the statistics and fall back (:mod:`m2rnn_jax.models.lm_head_loss`).

Grid (R / BM, V / BN) with the row tiles fastest: the programs that share one column block of W run together, so W
is read from memory about once and x (R, K) stays in L2.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu import fast_math


@dataclasses.dataclass(frozen=True)
class LogitsTilesConfig:
    """Launch parameters: the GEMM tile (block_rows x block_v), the depth step block_k, Triton warps and stages."""

    block_rows: int = 128
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_v", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("block_rows", "block_v", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16 (Triton's dot), got {value}")

    @classmethod
    def parse(cls, text: str) -> LogitsTilesConfig:
        """``"128x128x64x8x3"`` (rows x columns x depth x warps x stages) -> the config."""
        parts = text.split("x")
        if len(parts) != 5 or not all(part.isdigit() for part in parts):
            raise ValueError(f"config: expected ROWSxCOLSxDEPTHxWARPSxSTAGES such as 128x128x64x8x3, got {text!r}")
        return cls(*(int(part) for part in parts))

    def compiler_params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def default_config(rows: int, depth: int, vocab: int) -> LogitsTilesConfig:
    """128 x 128 tiles, depth steps of 64, 4 warps, 3 stages (the block sizes shrunk to the next power of two of a
    smaller dimension, at least 16): the fastest of nine launch configurations on the H200 at one 2048-token chunk
    of the 400M head (2026-12-04, ``python -m m2rnn_jax.bench.loss --kernel-rows 2048 --tile-configs ...``: 0.865 ms
    with exp written, 487 TFLOP/s; XLA's GEMM writing float32 logits 0.615 ms; docs/lm_head_loss_and_remat.md)."""

    def fit(size: int, limit: int) -> int:
        return max(16, min(limit, 1 << max(0, size - 1).bit_length()))

    return LogitsTilesConfig(block_rows=fit(rows, 128), block_v=fit(vocab, 128), block_k=fit(depth, 64))


class LogitsTiles(NamedTuple):
    """What :func:`logits_softmax_tiles` returns (T = ceil(V / block_v) column tiles).

    Attributes:
        tile_max: (T, R) float32 (float64 for float64 inputs), each tile's row maxima of the logits.
        tile_argmax: (T, R) int32, the first column (global index) of each tile's row maximum.
        tile_sumexp: (T, R) sum over the tile's columns of exp(logits - tile_max).
        exp_logits: (R, V) exp(logits - reference) in the inputs' dtype, or None when not asked for.
    """

    tile_max: jax.Array
    tile_argmax: jax.Array
    tile_sumexp: jax.Array
    exp_logits: jax.Array | None


class RowStatistics(NamedTuple):
    """Per-row softmax statistics of the logits, each (R,): maximum, first argmax and logsumexp."""

    max: jax.Array
    argmax: jax.Array
    logsumexp: jax.Array


def combine_tiles(tiles: LogitsTiles) -> RowStatistics:
    """The (T, R) tile statistics -> one value per row (ties between tiles go to the first tile: the first index)."""
    row_max = jnp.max(tiles.tile_max, axis=0)
    best_tile = jnp.argmax(tiles.tile_max, axis=0)
    argmax = jnp.take_along_axis(tiles.tile_argmax, best_tile[None], axis=0)[0]
    total = jnp.sum(tiles.tile_sumexp * jnp.exp(tiles.tile_max - row_max), axis=0)
    return RowStatistics(row_max, argmax, row_max + jnp.log(total))


def _load(ref, mask):
    """A load, masked (zeros outside) only where ``mask`` is given: Triton refuses a fill value without a mask."""
    return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=0)


def _kernel(x_ref, w_ref, c_ref, max_ref, argmax_ref, sumexp_ref, *exp_ref, rows, depth, vocab, config, precision):
    bm, bn, bk = config.block_rows, config.block_v, config.block_k
    i, j = pl.program_id(0), pl.program_id(1)
    row_ids = i * bm + jnp.arange(bm, dtype=jnp.int32)
    col_ids = j * bn + jnp.arange(bn, dtype=jnp.int32)
    # Masks only where a dimension is not a multiple of its block (static): the aligned case loads unmasked.
    row_ok = row_ids < rows if rows % bm else None
    col_ok = col_ids < vocab if vocab % bn else None
    row_slice, col_slice = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def both(a, b):
        return b if a is None else a if b is None else a & b

    def step(kk, acc):
        depth_ok = kk * bk + jnp.arange(bk, dtype=jnp.int32) < depth if depth % bk else None
        x_mask = both(None if row_ok is None else row_ok[:, None], None if depth_ok is None else depth_ok[None, :])
        w_mask = both(None if depth_ok is None else depth_ok[:, None], None if col_ok is None else col_ok[None, :])
        a = _load(x_ref.at[row_slice, pl.ds(kk * bk, bk)], x_mask)
        b = _load(w_ref.at[pl.ds(kk * bk, bk), col_slice], w_mask)
        dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc.dtype)

    accumulation = jnp.promote_types(jnp.float32, x_ref.dtype)
    logits = lax.fori_loop(0, pl.cdiv(depth, bk), step, jnp.zeros((bm, bn), accumulation))
    if col_ok is not None:
        logits = jnp.where(col_ok[None, :], logits, -jnp.inf)
    tile_max = jnp.max(logits, axis=1)
    first = jnp.min(jnp.where(logits == tile_max[:, None], col_ids[None, :], vocab), axis=1)
    relative = fast_math.exp(logits - tile_max[:, None])  # the one exponential per element
    sumexp = jnp.sum(relative, axis=1)
    pltriton.store(max_ref.at[j, row_slice], tile_max, mask=row_ok)
    pltriton.store(argmax_ref.at[j, row_slice], first, mask=row_ok)
    pltriton.store(sumexp_ref.at[j, row_slice], sumexp, mask=row_ok)
    if exp_ref:
        (out_ref,) = exp_ref
        reference = _load(c_ref.at[row_slice], row_ok).astype(accumulation)
        # exp(logits - c) = exp(logits - tile max) exp(tile max - c); finite where the caller's check passes
        values = (relative * fast_math.exp(tile_max - reference)[:, None]).astype(out_ref.dtype)
        mask = both(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
        pltriton.store(out_ref.at[row_slice, col_slice], values, mask=mask)


def logits_softmax_tiles(
    hidden: jax.Array,
    kernel: jax.Array,
    reference: jax.Array,
    *,
    with_exp: bool = True,
    config: LogitsTilesConfig | None = None,
    interpret: bool = False,
) -> LogitsTiles:
    """Tile statistics of the logits ``hidden @ kernel`` and, optionally, ``exp(logits - reference)``.

    Args:
        hidden: (R, K) in the compute dtype (bfloat16, float32; float64 in interpret mode).
        kernel: (K, V) in the same dtype.
        reference: (R,) float per-row reference c of ``exp_logits`` (ignored without ``with_exp``).
        with_exp: also write ``exp_logits`` (R, V); False computes the statistics only (no (R, V) output).
        config: launch parameters; default :func:`default_config`.
        interpret: run in Pallas interpret mode (any backend, for tests).

    Returns:
        :class:`LogitsTiles`. Float32 operands multiply at full precision (no TF32).

    Raises:
        ValueError: on shapes or dtypes that do not fit together.
    """
    if hidden.ndim != 2 or min(hidden.shape) < 1:
        raise ValueError(f"hidden: expected shape (R, K) with R, K >= 1, got {hidden.shape}")
    rows, depth = hidden.shape
    if kernel.ndim != 2 or kernel.shape[0] != depth or kernel.shape[1] < 1:
        raise ValueError(f"kernel: expected shape ({depth}, V) with V >= 1, got {kernel.shape}")
    if kernel.dtype != hidden.dtype or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise ValueError(f"kernel: expected the float dtype of hidden ({hidden.dtype}), got {kernel.dtype}")
    if reference.shape != (rows,):
        raise ValueError(f"reference: expected shape ({rows},), got {reference.shape}")
    vocab = kernel.shape[1]
    config = default_config(rows, depth, vocab) if config is None else config
    tiles = pl.cdiv(vocab, config.block_v)
    accumulation = jnp.promote_types(jnp.float32, hidden.dtype)
    out_shape = [
        jax.ShapeDtypeStruct((tiles, rows), accumulation),
        jax.ShapeDtypeStruct((tiles, rows), jnp.int32),
        jax.ShapeDtypeStruct((tiles, rows), accumulation),
    ]
    if with_exp:
        out_shape.append(jax.ShapeDtypeStruct((rows, vocab), hidden.dtype))
    precision = lax.Precision.HIGHEST if hidden.dtype == jnp.float32 else None
    body = functools.partial(_kernel, rows=rows, depth=depth, vocab=vocab, config=config, precision=precision)
    outputs = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(pl.cdiv(rows, config.block_rows), tiles),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="logits_softmax_tiles" + ("_and_exp" if with_exp else ""),
    )(hidden, kernel, reference.astype(accumulation))
    return LogitsTiles(*outputs[:3], outputs[3] if with_exp else None)
