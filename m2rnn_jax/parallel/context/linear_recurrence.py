"""Linear recurrences (Gated DeltaNet, Mamba2's SSD) with the sequence split over a context axis.

Call these inside ``jax.shard_map`` with the sequence dimension split into contiguous shards over ``axis_name``;
they take and return LOCAL shards in the layout of the single-device op.

Both recurrences are affine in their state: a shard's end state is ``S_end = P S_start + S_local``, where
``S_local`` is the end state reached from a zero start and ``P`` is the product of the shard's transitions (a
(K, K) matrix per head for the delta rule, a scalar per head for SSD; 0 when a document starts inside the shard).
So every shard computes its pair (P, S_local) independently, the pairs are all-gathered and combined in shard order
(``S_start(0) = h0``, ``S_start(r + 1) = P_r S_start(r) + S_local_r``; n <= 8 sequential steps of one small matmul
per head, done redundantly on every shard), and each shard then finishes its outputs with its own incoming state:

* gated delta rule: ``P`` is the op's final state for ``v = 0`` and ``h0 = I`` (the op is linear in (v, h0)), and
  the outputs are the op rerun with ``h0 = S_start``: exact by construction, any backend of the op, three op
  calls per shard (``S_local``: V columns, ``P``: K columns, the rerun: V columns);
* SSD: ``P = exp(Σ log_decay)`` and the outputs of the zero-start run get the closed-form correction
  ``y_t += exp(Γ_t) S_startᵀ C_t`` (Γ_t the decay summed from the shard start, 0 from the shard's first reset on).

Gradients come from autodiff through ``all_gather`` / ``psum`` (no custom VJP). The final state is the last shard's
end state, replicated over the axis (:func:`~m2rnn_jax.parallel.context.collectives.last_shard_value`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from m2rnn_jax.checks import require
from m2rnn_jax.ops import gated_delta_rule, ssd
from m2rnn_jax.parallel.context.collectives import context_size, gather_shards, last_shard_value, zeros_varying_like

HIGHEST = jax.lax.Precision.HIGHEST

# apply(P, S) -> P S for one shard's transition P and a state S
Apply = Callable[[jax.Array, jax.Array], jax.Array]


def incoming_state(
    transition: jax.Array, local_state: jax.Array, h0: jax.Array | None, apply: Apply, axis_name: str
) -> jax.Array:
    """The state entering this shard, from every shard's (transition, zero-start end state) pair.

    Args:
      transition: this shard's P (any shape ``apply`` takes).
      local_state: this shard's end state from a zero start (B, H, ...).
      h0: the state entering shard 0 (shape of ``local_state``), or None (zeros).
      apply: ``apply(P, S) -> P S``.
      axis_name: the context axis.

    Returns:
      S_start of this shard, in ``local_state``'s dtype.
    """
    n = context_size(axis_name)
    transitions, local_states = gather_shards(transition, axis_name), gather_shards(local_state, axis_name)
    state = jnp.zeros_like(local_state) if h0 is None else h0.astype(local_state.dtype)
    starts = [state]
    for r in range(n - 1):
        state = apply(transitions[r], state) + local_states[r]
        starts.append(state)
    return jnp.stack(starts)[jax.lax.axis_index(axis_name)]


def _check_h0(h0: jax.Array | None, zero: jax.Array, layout: str) -> None:
    if h0 is not None:
        require(tuple(h0.shape) == zero.shape, "h0", f"shape {layout} = {zero.shape}", tuple(h0.shape))


def _matrix_apply(P: jax.Array, S: jax.Array) -> jax.Array:
    return jnp.einsum("bhij,bhjv->bhiv", P, S, precision=HIGHEST)


def _scalar_apply(a: jax.Array, S: jax.Array) -> jax.Array:
    return a[..., None, None] * S


def context_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    axis_name: str = "context",
    **op_kwargs,
) -> tuple[jax.Array, jax.Array]:
    """:func:`m2rnn_jax.ops.gated_delta_rule` over a sequence split into contiguous shards along ``axis_name``.

    Args:
      q, k: (B, S, H, K) local shards (S = local length), as the op takes them.
      v: (B, S, H, V) local shard.
      beta, log_alpha: (B, S, H) local shards.
      h0: (B, H, K, V) state entering the GLOBAL sequence (the same on every shard), or None (zeros).
      reset: (B, S) bool local shard of the global reset (True where a document starts; at local position 0 it
        must say whether the global position r S starts a document), or None.
      axis_name: the mesh axis the sequence is split over.
      **op_kwargs: ``chunk_size``, ``backend``, ``interpret`` of the op.

    Returns:
      o (B, S, H, V) local shard in q's dtype, and the state after the whole global sequence (B, H, K, V) in
      ``promote_types(float32, q.dtype)``, the same on every shard.

    Raises:
      ValueError from the op (shapes, dtypes, backend), or naming ``axis_name`` when no shard_map binds it.
    """
    context_size(axis_name)
    batch, _, heads, k_dim = q.shape
    inputs = (q, k, v, beta, log_alpha)
    dtype = jnp.promote_types(jnp.float32, q.dtype)
    zero = zeros_varying_like((batch, heads, k_dim, v.shape[-1]), dtype, *inputs)
    _check_h0(h0, zero, "(B, H, K, V)")
    _, local_state = gated_delta_rule(*inputs, zero, reset=reset, **op_kwargs)
    identity = jnp.eye(k_dim, dtype=dtype) + zeros_varying_like((batch, heads, k_dim, k_dim), dtype, *inputs)
    _, transition = gated_delta_rule(q, k, jnp.zeros_like(k), beta, log_alpha, identity, reset=reset, **op_kwargs)
    start = incoming_state(transition, local_state, h0, _matrix_apply, axis_name)
    o, final = gated_delta_rule(q, k, v, beta, log_alpha, start, reset=reset, **op_kwargs)
    return o, last_shard_value(final, axis_name)


def context_ssd(
    x: jax.Array,
    dt: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    axis_name: str = "context",
    **op_kwargs,
) -> tuple[jax.Array, jax.Array]:
    """:func:`m2rnn_jax.ops.ssd` (Mamba2's SSD) over a sequence split into contiguous shards along ``axis_name``.

    Args:
      x: (B, S, H, P) local shard; dt, log_decay = dt A: (B, S, H); B, C: (B, S, G, N) with G dividing H.
      h0: (B, H, P, N) state entering the GLOBAL sequence (the same on every shard), or None (zeros).
      reset: (B, S) bool local shard of the global reset, or None (as in :func:`context_gated_delta_rule`).
      axis_name: the mesh axis the sequence is split over.
      **op_kwargs: ``chunk_size``, ``backend`` of the op (the zero-start local run).

    Returns:
      y (B, S, H, P) local shard in x's dtype (without the D skip), and the state after the whole global sequence
      (B, H, P, N) in ``promote_types(float32, x.dtype)``, the same on every shard.

    Raises:
      ValueError from the op (shapes, dtypes, backend; h0 included), or naming ``axis_name`` when no shard_map
      binds it.
    """
    context_size(axis_name)
    inputs = (x, dt, log_decay, B, C)
    dtype = jnp.promote_types(jnp.float32, x.dtype)
    zero = zeros_varying_like((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), dtype, *inputs)
    _check_h0(h0, zero, "(B, H, P, N)")
    y, local_state = ssd(*inputs, zero, reset=reset, **op_kwargs)
    from_start = jnp.exp(jnp.cumsum(log_decay.astype(dtype), axis=1))  # (B, S, H): decay of the shard's start state
    if reset is not None:
        before_reset = jnp.cumsum(reset, axis=1, dtype=jnp.int32) == 0
        from_start = jnp.where(before_reset[..., None], from_start, 0)
    start = incoming_state(from_start[:, -1], local_state, h0, _scalar_apply, axis_name)
    C_heads = jnp.repeat(C.astype(dtype), x.shape[2] // C.shape[2], axis=2)  # (B, S, H, N), group h // (H / G)
    correction = from_start[..., None] * jnp.einsum("bhpn,bshn->bshp", start, C_heads, precision=HIGHEST)
    final = _scalar_apply(from_start[:, -1], start) + local_state
    return (y.astype(dtype) + correction).astype(x.dtype), last_shard_value(final, axis_name)
