"""Causal softmax attention with the sequence split over a context axis (all-gather of K/V, or a ring).

Call inside ``jax.shard_map`` with the sequence split into contiguous shards over ``axis_name``: shard r of n holds
global positions [r S, (r + 1) S). Query i of shard r may attend to key j of shard s when s S + j <= r S + i (and,
with documents, both lie in one document). Two ways to bring the keys to the queries:

* ``"all_gather"``: every shard gathers the whole K and V (B, n S, Nkv, d) and attends once. Memory per device:
  the full K/V, 2 B n S Nkv d elements, plus the (B, Nq, S, n S) float32 scores.
* ``"ring"`` (default): n steps; at step t shard r holds the K/V block of shard (r - t) mod n, folds it into a
  running (max, sum, weighted sum) online softmax and passes it on with ``ppermute`` (r -> r + 1). Memory: two K/V
  blocks and one (B, Nq, S, S) block of scores at a time in the forward; the backward (autodiff, each block
  rematerialised) keeps every step's K/V block, i.e. the whole K/V again, but one block of scores at a time.
  Blocks from later shards are fully masked and still computed (the last shard has no such block, so skipping
  them would not shorten the step).

Both compute the softmax in ``promote_types(float32, q.dtype)`` with the max shift held out of the gradient (the
result does not depend on it), so their values and gradients equal one-device attention (``jax.nn.
dot_product_attention`` or the layer's float64 path). Gradients by autodiff through ``all_gather`` / ``ppermute``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2rnn_jax.checks import require
from m2rnn_jax.layers.documents import document_index
from m2rnn_jax.layers.rope import apply_rope
from m2rnn_jax.parallel.context.collectives import context_size

HIGHEST = jax.lax.Precision.HIGHEST
METHODS = ("ring", "all_gather")


class Partial(NamedTuple):
    """Online-softmax state of one query block against the keys seen so far (compute dtype).

    max: (B, Nkv, G, S) running max of the scores (-inf where nothing was visible), held out of the gradient;
    total: (B, Nkv, G, S) sum of exp(score - max); weighted: (B, Nkv, G, S, d) sum of exp(score - max) v.
    """

    max: jax.Array
    total: jax.Array
    weighted: jax.Array


def global_positions(seq_len: int, axis_name: str = "context", start: int | jax.Array = 0) -> jax.Array:
    """(S,) int32 global positions of this shard's tokens: ``start + r S + arange(S)`` on shard r (for RoPE)."""
    offset = start + jax.lax.axis_index(axis_name) * seq_len
    return (offset + jnp.arange(seq_len)).astype(jnp.int32)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _block(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float) -> Partial:
    """q (B, S, Nkv, G, d), k/v (B, T, Nkv, d), allowed (B or 1, S, T) -> this block's Partial.

    Rematerialised: the backward recomputes the block's scores from q, k, v instead of keeping them, so a training
    step holds the (B, Nq, S, T) scores of one block at a time."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # K/V travel in their own dtype, q is in the compute dtype
    scores = jnp.einsum("bsngd,btnd->bngst", q, k, precision=HIGHEST) * scale
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
    shift = jnp.where(jnp.isfinite(top), top, 0)
    weights = jnp.exp(scores - shift[..., None])
    return Partial(top, weights.sum(-1), jnp.einsum("bngst,btnd->bngsd", weights, v, precision=HIGHEST))


def _merge(a: Partial, b: Partial) -> Partial:
    top = jnp.maximum(a.max, b.max)
    shift = jnp.where(jnp.isfinite(top), top, 0)
    wa, wb = jnp.exp(a.max - shift), jnp.exp(b.max - shift)  # 0 for a block with nothing visible
    return Partial(top, wa * a.total + wb * b.total, wa[..., None] * a.weighted + wb[..., None] * b.weighted)


def _allowed(
    query_positions: jax.Array,
    key_positions: jax.Array,
    query_documents: jax.Array | None,
    key_documents: jax.Array | None,
) -> jax.Array:
    """(B or 1, S, T) bool: key position <= query position, in the same document when documents are given."""
    allowed = (key_positions[None, :] <= query_positions[:, None])[None]
    if query_documents is not None:
        allowed = allowed & (query_documents[:, :, None] == key_documents[:, None, :])
    return allowed


def context_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    rope_theta: float | None = None,
    start: int | jax.Array = 0,
    segment_ids: jax.Array | None = None,
    method: str = "ring",
    axis_name: str = "context",
) -> jax.Array:
    """Causal attention of this shard's queries to the keys of this and every earlier shard.

    Args:
      q: (B, S, Nq, d) local shard (S = local length), before RoPE.
      k, v: (B, S, Nkv, d) local shards, Nkv dividing Nq (query head n reads key/value head n // (Nq / Nkv)), same
        dtype as q.
      scale: score scale, default 1/sqrt(d).
      rope_theta: apply RoPE (:func:`m2rnn_jax.layers.rope.apply_rope`) to q and k at their GLOBAL positions
        (:func:`global_positions`), or None (NoPE; the caller may rotate q and k itself with those positions).
      start: global position of the first token of shard 0 (a cache offset; RoPE only).
      segment_ids: (B, S) local shard of the global document ids (a document starts where the id changes; the
        first position of the whole sequence starts document 0), or None.
      method: "ring" or "all_gather" (module docstring).
      axis_name: the mesh axis the sequence is split over.

    Returns:
      (B, S, Nq, d) in q's dtype.

    Raises:
      ValueError naming the argument for wrong ranks, shapes, dtypes, a head count Nkv that does not divide Nq, an
      unknown method, or an ``axis_name`` no shard_map binds.
    """
    n = context_size(axis_name)
    require(method in METHODS, "method", f"one of {list(METHODS)}", method)
    require(q.ndim == 4, "q", "shape (B, S, Nq, d)", tuple(q.shape))
    batch, seq_len, num_heads, head_dim = q.shape
    for name, x in (("k", k), ("v", v)):
        require(
            x.ndim == 4 and (x.shape[0], x.shape[1], x.shape[3]) == (batch, seq_len, head_dim),
            name,
            f"shape (B, S, Nkv, d) with (B, S, d) = {(batch, seq_len, head_dim)}",
            tuple(x.shape),
        )
    require(k.shape == v.shape, "v", f"the shape of k {tuple(k.shape)}", tuple(v.shape))
    require(q.dtype == k.dtype == v.dtype, "k, v", f"q's dtype {q.dtype}", (k.dtype, v.dtype))
    num_kv_heads = k.shape[2]
    require(num_heads % num_kv_heads == 0, "k", f"a head count Nkv that divides Nq = {num_heads}", num_kv_heads)
    require(
        segment_ids is None or tuple(segment_ids.shape) == (batch, seq_len),
        "segment_ids",
        f"shape (B, S) = {(batch, seq_len)}",
        None if segment_ids is None else tuple(segment_ids.shape),
    )

    positions = global_positions(seq_len, axis_name)
    if rope_theta is not None:
        q, k = apply_rope(q, positions + start, rope_theta), apply_rope(k, positions + start, rope_theta)
    documents = None
    if segment_ids is not None:  # (B, n S) document index of every global position, on every shard
        every_id = jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
        documents = document_index(every_id, batch, n * seq_len)

    def block_documents(shard: jax.Array) -> jax.Array | None:
        return None if documents is None else jax.lax.dynamic_slice_in_dim(documents, shard * seq_len, seq_len, 1)

    dtype = jnp.promote_types(jnp.float32, q.dtype)
    scale = head_dim**-0.5 if scale is None else scale
    rank = jax.lax.axis_index(axis_name)
    grouped = q.astype(dtype).reshape(batch, seq_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    query_documents = block_documents(rank)
    if method == "all_gather":
        every_k, every_v = (jax.lax.all_gather(x, axis_name, axis=1, tiled=True) for x in (k, v))
        every_position = jnp.arange(n * seq_len)
        result = _block(
            grouped, every_k, every_v, _allowed(positions, every_position, query_documents, documents), scale
        )
    else:
        result = None
        ring = [(r, (r + 1) % n) for r in range(n)]
        for step in range(n):
            source = (rank - step) % n
            allowed = _allowed(
                positions, source * seq_len + jnp.arange(seq_len), query_documents, block_documents(source)
            )
            partial = _block(grouped, k, v, allowed, scale)
            result = partial if result is None else _merge(result, partial)
            if step < n - 1:
                k, v = jax.lax.ppermute(k, axis_name, ring), jax.lax.ppermute(v, axis_name, ring)
    out = result.weighted / result.total[..., None]  # (B, Nkv, G, S, d)
    return jnp.moveaxis(out, 3, 1).reshape(batch, seq_len, num_heads, head_dim).astype(q.dtype)
