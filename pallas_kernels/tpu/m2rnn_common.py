"""Pieces shared by the forward and backward ``pallas_call`` builders: packing the op's inputs, VMEM accounting,
compiler parameters and interpret-mode selection."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.heads import expand_heads
from pallas_kernels.tpu.m2rnn_layout import (
    LANES,
    BlockPlan,
    pack_gate,
    pack_lanes,
    pack_sources,
    pack_state,
    pack_weight,
    plan_blocks,
    source_lanes,
    source_slots,
)

# The default scoped-VMEM limit of v5e (16 MiB) is the smallest of current chips; a larger request is passed to the
# compiler explicitly, and anything above this cap is refused (v7x has 64 MiB of VMEM per core).
_DEFAULT_SCOPED_VMEM = 16 * 2**20
_MAX_VMEM = 48 * 2**20


class PackedInputs(NamedTuple):
    """Inputs in the kernel layout (see layout.py): q (R, G, Sp, mq, Kp) and k (R, G, Sp, mk, Kp) in the input
    dtype with their source lanes q_src (G, mq, L), k_src (G, mk, L) float32 and slot tables q_slots (G, mq),
    k_slots (G, mk) (numpy); v (R, G, Sp, L) in the input dtype; f (R, G, Sp, L) float32; w (G, L, L) float32;
    h0 (B, G, Kp, L) float32; cu_seqlens (B+1,) int32 or None."""

    q: jax.Array
    k: jax.Array
    q_src: jax.Array
    k_src: jax.Array
    q_slots: np.ndarray
    k_slots: np.ndarray
    v: jax.Array
    f: jax.Array
    w: jax.Array
    h0: jax.Array
    cu_seqlens: jax.Array | None


def as_rows(x: jax.Array, varlen: bool) -> jax.Array:
    """Give varlen arrays (T, ...) a leading rows axis of size 1; dense arrays (B, S, ...) already have one."""
    return x[None] if varlen else x


def pack_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    cu_seqlens: jax.Array | None,
    chunk_size: int | None,
    num_heads: int,
) -> tuple[BlockPlan, PackedInputs]:
    """Plan the blocks and pack inputs with their own head counts: q (B, S, Nq, K) | (T, Nq, K); k (.., Nk, K);
    v (.., Nv, V); f (.., Nf); w (Nw, V, V); h0 (B, N, K, V) or None (zeros). v, f and w are repeated to the
    ``num_heads`` N = max(Nq, Nk, Nv, Nf, Nw) heads (the caller validated the counts)."""
    varlen = cu_seqlens is not None
    q, k, v, f = (as_rows(x, varlen) for x in (q, k, v, f))
    rows, tokens, _, k_dim = q.shape
    v_dim = v.shape[-1]
    num_seqs = cu_seqlens.shape[0] - 1 if varlen else rows
    plan = plan_blocks(rows, tokens, num_heads, k_dim, v_dim, chunk_size)
    if h0 is None:
        h0 = jnp.zeros((num_seqs, num_heads, k_dim, v_dim), jnp.float32)
    q_slots, k_slots = source_slots(plan, q.shape[2]), source_slots(plan, k.shape[2])
    packed = PackedInputs(
        q=pack_sources(q, plan, q_slots),
        k=pack_sources(k, plan, k_slots),
        q_src=jnp.asarray(source_lanes(plan, q_slots, q.shape[2])),
        k_src=jnp.asarray(source_lanes(plan, k_slots, k.shape[2])),
        q_slots=q_slots,
        k_slots=k_slots,
        v=pack_lanes(expand_heads(v, num_heads, 2), plan),
        f=pack_gate(expand_heads(f.astype(jnp.float32), num_heads, 2), plan),
        w=pack_weight(expand_heads(w, num_heads, 0), plan),
        h0=pack_state(h0.astype(jnp.float32), plan),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.astype(jnp.int32),
    )
    return plan, packed


def _buffer_bytes(shape: tuple[int, ...], dtype) -> int:
    """VMEM bytes of one buffer: the last two dims are padded to whole (8 * 4/itemsize, 128) tiles."""
    itemsize = np.dtype(dtype).itemsize
    sublanes = 8 * max(1, 4 // itemsize)
    if len(shape) == 1:
        shape = (1,) + tuple(shape)
    *lead, rows, cols = shape
    padded_rows = -(-rows // sublanes) * sublanes
    padded_cols = -(-cols // LANES) * LANES
    return math.prod(lead) * padded_rows * padded_cols * itemsize


def vmem_bytes(pipelined: list[tuple[tuple[int, ...], object]], scratch: list[tuple[tuple[int, ...], object]]) -> int:
    """VMEM of one kernel: pipelined blocks (inputs and outputs) are double-buffered, scratch is single."""
    return 2 * sum(_buffer_bytes(s, d) for s, d in pipelined) + sum(_buffer_bytes(s, d) for s, d in scratch)


def compiler_params(vmem: int) -> pltpu.CompilerParams:
    """Grid (rows, head blocks, chunks): the first two are independent, the chunk axis carries the recurrence."""
    if vmem > _MAX_VMEM:
        raise ValueError(
            f"chunk_size: the kernel would need {vmem / 2**20:.1f} MiB of VMEM (more than {_MAX_VMEM / 2**20:.0f} "
            "MiB); pass a smaller chunk_size"
        )
    limit = None if vmem * 5 // 4 <= _DEFAULT_SCOPED_VMEM else min(_MAX_VMEM, vmem * 5 // 4 + 2**20)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)


def interpret_mode(interpret):
    """``True`` means TPU interpret mode with default parameters; an InterpretParams is used as given."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret


def hbm_spec() -> pl.BlockSpec:
    """An operand left in HBM (copied by explicit DMAs in the kernel)."""
    return pl.BlockSpec(memory_space=pl.ANY)


def smem_scalar_grid(num_scalar_prefetch: int, grid, in_specs, out_specs, scratch_shapes):
    """A grid spec; with ``num_scalar_prefetch`` = 1 the first operand (cu_seqlens) is prefetched into SMEM."""
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalar_prefetch,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch_shapes,
    )
