"""SSD chunked form (the training form of Mamba2's recurrence).

With chunk length L, Γ_t = Σ_{u≤t} dt_u A inside a chunk and s_0 the state entering it:
y_t = Σ_{i≤t} e^{Γ_t - Γ_i} (C_t·B_i) dt_i x_i + e^{Γ_t} s_0 C_t and
s_L = e^{Γ_L} s_0 + Σ_i e^{Γ_L - Γ_i} dt_i x_i B_iᵀ; the intra-chunk terms of all chunks are computed in parallel
and a scan over chunks carries s. Ragged lengths are zero-padded at the end (dt = 0 leaves the state untouched).
Document resets: the pairwise decay between positions of different documents is 0, the chunk-start state reaches
only positions before the chunk's first reset, and the carried state is zeroed by a reset inside the chunk. The
chunking and these decay weights are shared with the gated delta rule (:mod:`m2rnn_jax.ops.chunking`); the decayed
sum carried over chunks is this module's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.chunking import chunk_decays, merge_chunks, split_chunks
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

    def chunks(t):  # (b, S, ...) -> (n, b, L, ...)
        return jnp.moveaxis(split_chunks(t, L), 1, 0)

    def steps_last(t):  # (n, b, L, ...) -> (n, b, ..., L)
        return jnp.moveaxis(t, 2, -1)

    xdt = chunks(split_groups(x * dt[..., None], groups))  # (n, b, L, G, R, P)
    B, C = chunks(B), chunks(C)  # (n, b, L, G, N)
    chunk_reset = None if reset is None else chunks(reset)[:, :, None, None]  # (n, b, 1, 1, L)
    decay, start, end, carry = chunk_decays(steps_last(chunks(split_groups(log_decay, groups))), chunk_reset)
    scores = jnp.einsum("nbtgs,nbigs->nbgti", C, B)
    y_diag = jnp.einsum("nbgti,nbgrti,nbigrp->nbtgrp", scores, decay, xdt)  # decay (n, b, G, R, L, L)
    to_end = jnp.moveaxis(end, -1, 2)  # (n, b, L, G, R)
    chunk_states = jnp.einsum("nbigr,nbigrp,nbigs->nbgrps", to_end, xdt, B)
    from_start = jnp.moveaxis(start, -1, 2)  # (n, b, L, G, R): weight of s_0, 0 from the chunk's first reset on

    def step(state, inputs):
        C_c, from_start_c, carry_c, chunk_state = inputs
        y_off = jnp.einsum("btgs,bgrps->btgrp", C_c, state) * from_start_c[..., None]
        return carry_c[..., None, None] * state + chunk_state, y_off

    state = h0.reshape(batch, groups, -1, *h0.shape[2:])  # (b, G, R, P, N)
    final, y_off = jax.lax.scan(step, state, (C, from_start, carry, chunk_states))
    y = merge_chunks(jnp.moveaxis(y_diag + y_off, 0, 1), seq_len)  # (b, S, G, R, P)
    return y.reshape(batch, seq_len, -1, P), final.reshape(h0.shape)
