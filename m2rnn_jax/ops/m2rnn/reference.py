"""The ``lax.scan`` reference implementation of the M2RNN recurrence (the ground truth of every backend).

Per head, with state H (K, V), inputs q_t, k_t (K,), v_t (V,), forget value f_t and weight W (V, V):

    Z_t = tanh(H_{t-1} W + k_t v_t^T)
    H_t = f_t H_{t-1} + (1 - f_t) Z_t
    y_t = H_t^T q_t

Gradients come from JAX autodiff through the scan; state-gradient clipping uses :func:`clamp_cotangent` on the
carried state, which gives exactly the fused-kernel semantics of SPEC §0.1. Broadcast heads are expanded inside each
step, so the memory of the reference stays O(inputs) plus the scan's saved activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.clipping import clamp_cotangent
from m2rnn_jax.ops.heads import expand_heads
from m2rnn_jax.ops.m2rnn.validation import M2RNNShapes, resolve_shapes, state_dtypes

_HIGHEST = jax.lax.Precision.HIGHEST


def _step(
    h_prev: jax.Array,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    f_t: jax.Array,
    w: jax.Array,
    storage_dtype: jnp.dtype,
    compute_dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """One step for a batch of sequences.

    h_prev (..., N, K, V); q_t (..., Nq, K); k_t (..., Nk, K); v_t (..., Nv, V); f_t (..., Nf); w (N, V, V).
    Returns the new state (..., N, K, V) rounded to ``storage_dtype`` and the readout (..., N, V) of that stored
    state in ``compute_dtype``.
    """
    num_heads = w.shape[0]
    q_t = expand_heads(q_t.astype(compute_dtype), num_heads, axis=-2)
    k_t = expand_heads(k_t.astype(compute_dtype), num_heads, axis=-2)
    v_t = expand_heads(v_t.astype(compute_dtype), num_heads, axis=-2)
    f_t = expand_heads(f_t.astype(compute_dtype), num_heads, axis=-1)[..., None, None]
    h_prev = h_prev.astype(compute_dtype)
    recurrent = jnp.einsum("...nkv,nvw->...nkw", h_prev, w, precision=_HIGHEST)
    z = jnp.tanh(recurrent + k_t[..., :, None] * v_t[..., None, :])
    h = (f_t * h_prev + (1 - f_t) * z).astype(storage_dtype)
    y = jnp.einsum("...nkv,...nk->...nv", h.astype(compute_dtype), q_t, precision=_HIGHEST)
    return h, y


def m2rnn_scan_dense(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    *,
    gradient_clipping: float | None,
    state_dtype: jnp.dtype,
    reset: jax.Array | None = None,
    shapes: M2RNNShapes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense reference: q (B,S,Nq,K), k (B,S,Nk,K), v (B,S,Nv,V), f (B,S,Nf), W (Nw,V,V), h0 (B,N,K,V) | None.

    ``reset`` (B,S) bool or None: where set, the state entering step t is zero instead of H_{t-1} (a new document
    starts at t). The zeroing sits after the clamped carry, so no cotangent flows from step t into the earlier
    document: each document gets exactly the gradients of a separate run from zeros.
    Returns y (B,S,N,V) and the final state (B,N,K,V), both in the arithmetic dtype (the op casts them).
    ``gradient_clipping`` must already be normalised (None or |c|). ``shapes``: the sizes ``validate_inputs``
    returned (None: validated here).
    """
    storage_dtype, compute_dtype = state_dtypes(state_dtype, q.dtype)
    shapes = resolve_shapes(shapes, q, k, v, W, f, h0, None)
    w = expand_heads(W.astype(compute_dtype), shapes.num_heads, axis=0)
    if h0 is None:
        h_init = jnp.zeros((shapes.batch, shapes.num_heads, shapes.k_dim, shapes.v_dim), storage_dtype)
    else:
        h_init = h0.astype(storage_dtype)

    def body(h_prev, xs):
        *step_inputs, reset_t = xs
        if reset_t is not None:
            h_prev = jnp.where(reset_t[:, None, None, None], jnp.zeros_like(h_prev), h_prev)
        h, y = _step(h_prev, *step_inputs, w, storage_dtype, compute_dtype)
        carry = h if gradient_clipping is None else clamp_cotangent(h, gradient_clipping)
        return carry, y

    time_major = tuple(None if x is None else jnp.swapaxes(x, 0, 1) for x in (q, k, v, f, reset))
    h_final, ys = jax.lax.scan(body, h_init, time_major)
    return jnp.swapaxes(ys, 0, 1), h_final


def sequence_positions(cu_seqlens: jax.Array, tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For packed tokens t in [0, T): the sequence index of t, whether t starts it and whether t ends it."""
    t = jnp.arange(tokens, dtype=cu_seqlens.dtype)
    seq = jnp.searchsorted(cu_seqlens, t, side="right").astype(jnp.int32) - 1
    is_start = t == cu_seqlens[seq]
    is_end = t == cu_seqlens[seq + 1] - 1
    return seq, is_start, is_end


def m2rnn_scan_varlen(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    cu_seqlens: jax.Array,
    *,
    gradient_clipping: float | None,
    state_dtype: jnp.dtype,
    shapes: M2RNNShapes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Varlen reference over packed tokens: q (T,Nq,K), k (T,Nk,K), v (T,Nv,V), f (T,Nf), cu_seqlens (B+1,).

    One scan walks all T tokens; at the first token of sequence b the state is reset to h0[b], and at its last
    token the (clamped-cotangent) state is written to slot b of the final states. An empty sequence returns its h0.
    Returns y (T,N,V) and the final states (B,N,K,V) in the arithmetic dtype. ``shapes``: the sizes
    ``validate_inputs`` returned (None: validated here).
    """
    storage_dtype, compute_dtype = state_dtypes(state_dtype, q.dtype)
    shapes = resolve_shapes(shapes, q, k, v, W, f, h0, cu_seqlens)
    num_heads, k_dim, v_dim = shapes.num_heads, shapes.k_dim, shapes.v_dim
    w = expand_heads(W.astype(compute_dtype), num_heads, axis=0)
    if h0 is None:
        h0 = jnp.zeros((shapes.batch, num_heads, k_dim, v_dim), storage_dtype)
    else:
        h0 = h0.astype(storage_dtype)
    seq, is_start, is_end = sequence_positions(cu_seqlens, shapes.tokens)

    def body(carry, xs):
        h_prev, finals = carry
        q_t, k_t, v_t, f_t, seq_t, start_t, end_t = xs
        h_prev = jnp.where(start_t, h0[seq_t], h_prev)
        h, y = _step(h_prev, q_t, k_t, v_t, f_t, w, storage_dtype, compute_dtype)
        if gradient_clipping is not None:
            h = clamp_cotangent(h, gradient_clipping)
        finals = finals.at[seq_t].set(jnp.where(end_t, h, finals[seq_t]))
        return (h, finals), y

    h_init = jnp.zeros((num_heads, k_dim, v_dim), storage_dtype)
    (_, finals), ys = jax.lax.scan(body, (h_init, h0), (q, k, v, f, seq, is_start, is_end))
    return ys, finals
