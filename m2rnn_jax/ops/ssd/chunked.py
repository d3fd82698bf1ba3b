"""SSD chunked form (the training form of Mamba2's recurrence).

With chunk length L, Γ_t = Σ_{u≤t} dt_u A inside a chunk and s_0 the state entering it:
y_t = Σ_{i≤t} e^{Γ_t - Γ_i} (C_t·B_i) dt_i x_i + e^{Γ_t} s_0 C_t and
s_L = e^{Γ_L} s_0 + Σ_i e^{Γ_L - Γ_i} dt_i x_i B_iᵀ; the intra-chunk terms of all chunks are computed in parallel
and a scan over chunks carries s. Ragged lengths are zero-padded at the end (dt = 0 leaves the state untouched).
Document resets: the pairwise decay between positions of different documents is 0, the chunk-start state reaches
only positions before the chunk's first reset, and the carried state is zeroed by a reset inside the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.ssd.reference import split_groups


def ssd_chunked(
    x: jax.Array,
    dt: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array,
    chunk_size: int,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SSD chunked form (module docstring) with chunks of ``min(chunk_size, S)`` steps.

    Same arguments and results as :func:`m2rnn_jax.ops.ssd.reference.ssd_recurrent`: x (b, S, H, P), dt and
    log_decay (b, S, H), B and C (b, S, G, N), h0 (b, H, P, N), reset (b, S) bool or None
    -> (y (b, S, H, P) without the D skip, final state (b, H, P, N)).
    """
    batch, seq_len, _, P = x.shape
    groups = B.shape[2]
    L = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // L)
    pad = num_chunks * L - seq_len
    if reset is None:
        reset = jnp.zeros((batch, seq_len), dtype=jnp.bool_)

    def chunks(t):  # (b, S, ...) -> (n, b, L, ...)
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return jnp.moveaxis(t.reshape(batch, num_chunks, L, *t.shape[2:]), 1, 0)

    xdt = chunks(split_groups(x * dt[..., None], groups))  # (n, b, L, G, R, P)
    gamma = jnp.cumsum(chunks(split_groups(log_decay, groups)), axis=2)  # (n, b, L, G, R)
    B, C = chunks(B), chunks(C)  # (n, b, L, G, N)
    document = jnp.cumsum(chunks(reset), axis=2, dtype=jnp.int32)  # (n, b, L): resets so far in the chunk
    g = jnp.moveaxis(gamma, 2, -1)  # (n, b, G, R, L)
    same_document = document[..., :, None] == document[..., None, :]  # (n, b, L, L)
    visible = jnp.tril(jnp.ones((L, L), dtype=jnp.bool_)) & same_document[:, :, None, None]
    decay = jnp.exp(jnp.where(visible, g[..., :, None] - g[..., None, :], -jnp.inf))  # (n, b, G, R, L, L)
    scores = jnp.einsum("nbtgs,nbigs->nbgti", C, B)
    y_diag = jnp.einsum("nbgti,nbgrti,nbigrp->nbtgrp", scores, decay, xdt)
    last = gamma[:, :, -1]  # (n, b, G, R)
    in_last_document = (document == document[:, :, -1:])[..., None, None]  # (n, b, L, 1, 1)
    to_end = jnp.where(in_last_document, jnp.exp(last[:, :, None] - gamma), 0)
    chunk_states = jnp.einsum("nbigr,nbigrp,nbigs->nbgrps", to_end, xdt, B)
    from_start = jnp.where((document == 0)[..., None, None], jnp.exp(gamma), 0)  # decay from s_0, 0 after a reset
    keeps_state = jnp.where(document[:, :, -1] == 0, 1.0, 0.0).astype(gamma.dtype)  # (n, b)

    def step(state, inputs):
        C_c, from_start_c, last_c, keeps_c, chunk_state = inputs
        y_off = jnp.einsum("btgs,bgrps->btgrp", C_c, state) * from_start_c[..., None]
        carried = (keeps_c[:, None, None] * jnp.exp(last_c))[..., None, None] * state
        return carried + chunk_state, y_off

    state = h0.reshape(batch, groups, -1, *h0.shape[2:])  # (b, G, R, P, N)
    final, y_off = jax.lax.scan(step, state, (C, from_start, last, keeps_state, chunk_states))
    y = jnp.moveaxis(y_diag + y_off, 0, 1).reshape(batch, num_chunks * L, -1, P)
    return y[:, :seq_len], final.reshape(h0.shape)
