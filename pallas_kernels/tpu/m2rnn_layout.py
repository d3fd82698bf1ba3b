"""Block geometry of the TPU kernels and the packing between the op's shapes and the kernel layout.

Kernel layout (the "packed" layout). A TPU vector register holds an (8, 128) tile of 32-bit values, and an MXU
pass multiplies 128-wide operands. A single head's state (K, V) = (64, 16) would fill only 16 of 128 lanes, so
``heads_per_block`` = hb heads sit side by side on the lane axis:

    state     (Kp, L)       L = hb * Vp lanes; lane l belongs to head l // Vp of the block, column l % Vp
    W         (L, L)        block diagonal: hb copies of a (Vp, Vp) head weight, zeros elsewhere
    v, f, y   (C, L)        one row per time step; f is repeated over the Vp lanes of its head
    q, k      (C, m, Kp)    one (m, Kp) slab per time step (leading-dim indexing, no sublane shuffles) holding
                            the m distinct *source* heads that the block's hb heads read (m = 1 for the paper's
                            Nq = Nk = 1), with a (m, L) 0/1 "source lanes" matrix saying which lanes use which slot

q and k are not repeated to N heads: a block reads only its m source heads, so their memory (and that of the
per-block partial gradients dq, dk) is G * m / Nq times that of q instead of N / Nq times. v, f and W are repeated
to N heads before packing (they are per-head data of the size of y, or tiny).

Padding (all exact): K -> Kp, a multiple of 8 (zero rows stay zero); V -> Vp, a power of two dividing 128 (or a
multiple of 128), padded with zero weight rows/columns; N -> G * hb heads (zero heads); the time axis -> a
multiple of the chunk C with forget value 1 and zero q/k/v, steps that leave the state (and, backward, the
already-clamped state cotangent) unchanged. Arrays of the op with N heads map to packed arrays with a leading
"rows" axis R (the batch B for dense inputs, 1 for varlen inputs whose sequences share one token stream) and a
head-block axis G.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

LANES = 128
SUBLANES = 8
DEFAULT_CHUNK = 64


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _padded_v_dim(v_dim: int) -> int:
    """The smallest power of two >= V that divides 128, or V rounded up to a multiple of 128 when V > 128."""
    if v_dim > LANES:
        return _round_up(v_dim, LANES)
    return 1 << (v_dim - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static sizes of one kernel call.

    rows: R, grid rows (B for dense inputs, 1 for varlen). tokens: S (dense) or T (varlen).
    num_heads: N. k_dim, v_dim: K, V. chunk: C, time steps per grid step (a multiple of 8).
    """

    rows: int
    tokens: int
    num_heads: int
    k_dim: int
    v_dim: int
    chunk: int

    @property
    def k_pad(self) -> int:
        """Kp: K rounded up to a multiple of 8 sublanes."""
        return _round_up(self.k_dim, SUBLANES)

    @property
    def v_pad(self) -> int:
        """Vp: V padded so that whole heads tile the 128 lanes."""
        return _padded_v_dim(self.v_dim)

    @property
    def heads_per_block(self) -> int:
        """hb: heads packed on the lane axis of one block (fewer when N itself is smaller)."""
        return min(max(1, LANES // self.v_pad), self.num_heads)

    @property
    def lanes(self) -> int:
        """L = hb * Vp: 128 (or a multiple of 128 when Vp > 128, or the full packed width when N < 128 / Vp)."""
        return self.heads_per_block * self.v_pad

    @property
    def head_blocks(self) -> int:
        """G = ceil(N / hb)."""
        return -(-self.num_heads // self.heads_per_block)

    @property
    def tokens_pad(self) -> int:
        """The time axis rounded up to a whole number of chunks."""
        return _round_up(self.tokens, self.chunk)

    @property
    def num_chunks(self) -> int:
        return self.tokens_pad // self.chunk


def plan_blocks(
    rows: int, tokens: int, num_heads: int, k_dim: int, v_dim: int, chunk_size: int | None = None
) -> BlockPlan:
    """Choose the block geometry; ``chunk_size`` (a positive multiple of 8) defaults to 64, capped by the length."""
    if chunk_size is None:
        chunk = min(DEFAULT_CHUNK, _round_up(max(tokens, 1), SUBLANES))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 8:
        raise ValueError(f"chunk_size: expected a positive multiple of 8 (TPU sublanes), got {chunk_size!r}")
    else:
        chunk = chunk_size
    return BlockPlan(rows=rows, tokens=tokens, num_heads=num_heads, k_dim=k_dim, v_dim=v_dim, chunk=chunk)


def _pad_axis(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))


def _pack_heads(x: jax.Array, plan: BlockPlan, feature_pad: int, time_fill: float = 0.0) -> jax.Array:
    """(R, S, N, D) -> (R, G, Sp, hb, feature_pad); padded time steps hold ``time_fill``, other padding zeros."""
    rows = x.shape[0]
    x = _pad_axis(x, 1, plan.tokens_pad, time_fill)
    x = _pad_axis(_pad_axis(x, 2, plan.head_blocks * plan.heads_per_block), 3, feature_pad)
    x = x.reshape(rows, plan.tokens_pad, plan.head_blocks, plan.heads_per_block, feature_pad)
    return x.transpose(0, 2, 1, 3, 4)


def _unpack_heads(x: jax.Array, plan: BlockPlan, feature_dim: int) -> jax.Array:
    """Inverse of :func:`_pack_heads`: (R, G, Sp, hb, Dp) -> (R, S, N, feature_dim)."""
    rows = x.shape[0]
    x = x.transpose(0, 2, 1, 3, 4).reshape(rows, plan.tokens_pad, -1, x.shape[-1])
    return x[:, : plan.tokens, : plan.num_heads, :feature_dim]


def pack_lanes(x: jax.Array, plan: BlockPlan, time_fill: float = 0.0) -> jax.Array:
    """(R, S, N, V) -> (R, G, Sp, L): heads of a block side by side on the lanes."""
    packed = _pack_heads(x, plan, plan.v_pad, time_fill)
    return packed.reshape(packed.shape[:3] + (plan.lanes,))


def unpack_lanes(x: jax.Array, plan: BlockPlan) -> jax.Array:
    """Inverse of :func:`pack_lanes`: (R, G, Sp, L) -> (R, S, N, V)."""
    split = x.reshape(x.shape[:3] + (plan.heads_per_block, plan.v_pad))
    return _unpack_heads(split, plan, plan.v_dim)


def pack_gate(f: jax.Array, plan: BlockPlan) -> jax.Array:
    """Forget values (R, S, N) -> (R, G, Sp, L), each repeated over its head's Vp lanes; time padding holds 1."""
    per_lane = jnp.broadcast_to(f[..., None], f.shape + (plan.v_pad,))
    packed = _pack_heads(per_lane, plan, plan.v_pad, time_fill=1.0)
    return packed.reshape(packed.shape[:3] + (plan.lanes,))


def unpack_gate_grad(df: jax.Array, plan: BlockPlan) -> jax.Array:
    """Per-lane forget-value gradients (R, G, Sp, L) -> (R, S, N), summed over each head's lanes."""
    split = df.reshape(df.shape[:3] + (plan.heads_per_block, plan.v_pad))
    return _unpack_heads(split, plan, plan.v_pad).sum(axis=-1)


def pack_state(h: jax.Array, plan: BlockPlan) -> jax.Array:
    """States (B, N, K, V) -> (B, G, Kp, L)."""
    batch = h.shape[0]
    h = _pad_axis(_pad_axis(_pad_axis(h, 1, plan.head_blocks * plan.heads_per_block), 2, plan.k_pad), 3, plan.v_pad)
    h = h.reshape(batch, plan.head_blocks, plan.heads_per_block, plan.k_pad, plan.v_pad)
    return h.transpose(0, 1, 3, 2, 4).reshape(batch, plan.head_blocks, plan.k_pad, plan.lanes)


def unpack_state(h: jax.Array, plan: BlockPlan) -> jax.Array:
    """Inverse of :func:`pack_state`: (B, G, Kp, L) -> (B, N, K, V)."""
    batch = h.shape[0]
    h = h.reshape(batch, plan.head_blocks, plan.k_pad, plan.heads_per_block, plan.v_pad)
    h = h.transpose(0, 1, 3, 2, 4).reshape(batch, -1, plan.k_pad, plan.v_pad)
    return h[:, : plan.num_heads, : plan.k_dim, : plan.v_dim]


def pack_weight(w: jax.Array, plan: BlockPlan) -> jax.Array:
    """Per-head weights (N, V, V) -> block-diagonal (G, L, L) in float32."""
    w = w.astype(jnp.float32)
    w = _pad_axis(_pad_axis(_pad_axis(w, 0, plan.head_blocks * plan.heads_per_block), 1, plan.v_pad), 2, plan.v_pad)
    w = w.reshape(plan.head_blocks, plan.heads_per_block, plan.v_pad, plan.v_pad)
    eye = jnp.eye(plan.heads_per_block, dtype=jnp.float32)
    block_diagonal = jnp.einsum("gaij,ab->gaibj", w, eye)
    return block_diagonal.reshape(plan.head_blocks, plan.lanes, plan.lanes)


def unpack_weight_grad(dw: jax.Array, plan: BlockPlan) -> jax.Array:
    """Block-diagonal gradients (G, L, L) -> per-head (N, V, V); off-diagonal blocks are dropped."""
    split = dw.reshape(plan.head_blocks, plan.heads_per_block, plan.v_pad, plan.heads_per_block, plan.v_pad)
    eye = jnp.eye(plan.heads_per_block, dtype=dw.dtype)
    per_head = jnp.einsum("gaibj,ab->gaij", split, eye).reshape(-1, plan.v_pad, plan.v_pad)
    return per_head[: plan.num_heads, : plan.v_dim, : plan.v_dim]


def source_slots(plan: BlockPlan, num_sources: int) -> np.ndarray:
    """(G, m) int: the source head that slot s of head block g holds (-1 for an unused slot).

    Output head n reads source head n // (N / num_sources); block g holds heads [g * hb, (g + 1) * hb) (clipped to
    N), so it reads a contiguous range of sources and m is the largest such range over the blocks.
    """
    repeat = plan.num_heads // num_sources
    hb = plan.heads_per_block
    first = [g * hb // repeat for g in range(plan.head_blocks)]
    last = [(min((g + 1) * hb, plan.num_heads) - 1) // repeat for g in range(plan.head_blocks)]
    slots = max(b - a + 1 for a, b in zip(first, last))
    table = np.full((plan.head_blocks, slots), -1, np.int32)
    for g, (a, b) in enumerate(zip(first, last)):
        table[g, : b - a + 1] = np.arange(a, b + 1)
    return table


def source_lanes(plan: BlockPlan, slots: np.ndarray, num_sources: int) -> np.ndarray:
    """(G, m, L) float32 0/1: entry [g, s, l] is 1 when lane l of block g belongs to a real head reading slot s."""
    repeat = plan.num_heads // num_sources
    lane_head = np.arange(plan.head_blocks)[:, None] * plan.heads_per_block + np.arange(plan.lanes) // plan.v_pad
    lane_source = np.where(lane_head < plan.num_heads, lane_head // repeat, -2)  # (G, L)
    return (lane_source[:, None, :] == slots[:, :, None]).astype(np.float32)


def pack_sources(x: jax.Array, plan: BlockPlan, slots: np.ndarray) -> jax.Array:
    """Source heads per block: (R, S, Nx, K) -> (R, G, Sp, m, Kp) (unused slots repeat a real head; their source
    lanes are zero)."""
    gathered = x[:, :, np.maximum(slots, 0).reshape(-1), :]  # (R, S, G * m, K)
    gathered = _pad_axis(_pad_axis(gathered, 1, plan.tokens_pad), 3, plan.k_pad)
    gathered = gathered.reshape(x.shape[0], plan.tokens_pad, plan.head_blocks, slots.shape[1], plan.k_pad)
    return gathered.transpose(0, 2, 1, 3, 4)


def unpack_source_grad(dx: jax.Array, plan: BlockPlan, slots: np.ndarray, num_sources: int) -> jax.Array:
    """Per-block partial gradients (R, G, Sp, m, Kp) -> (R, S, Nx, K), summing the blocks that share a source."""
    onehot = (slots[:, :, None] == np.arange(num_sources)).astype(np.float32)  # (G, m, Nx), unused slots all 0
    summed = jnp.einsum("rgtsk,gsn->rtnk", dx, jnp.asarray(onehot, dx.dtype), precision=jax.lax.Precision.HIGHEST)
    return summed[:, : plan.tokens, :, : plan.k_dim]
