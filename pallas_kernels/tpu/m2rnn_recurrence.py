"""In-kernel building blocks shared by the forward and backward TPU kernels (packed layout, see layout.py).

Shapes inside a kernel: state S (Kp, L) float32; block-diagonal W (L, L); per step the source slabs q_t (mq, Kp)
and k_t (mk, Kp); v_t, f_t, y_t, dy_t (1, L). A "source lanes" matrix ``src`` (m, L) is 1 where lane l belongs to a
head that reads source slot s (see layout.source_lanes); it broadcasts the shared q/k heads to the lanes and, in
the backward, sums the lanes back onto the slots.

MXU vs VPU for the V x V product. S W is one (Kp, L) @ (L, L) MXU matmul per step: with hb heads packed on the
lanes the block-diagonal W turns the hb tiny (Kp, Vp) @ (Vp, Vp) products into one lane-dense pass. The
alternative on the VPU needs, for every column j of a head, a lane broadcast of S[:, j] inside each head's lane
group (Vp cross-lane shuffles per step), which costs more than the MXU pass whose extra flops (hb times the useful
ones) are free at this size. The per-head expansions (k_t v_t^T, q_t^T S, and their transposes in the backward)
are also small matmuls against ``src`` so that no kernel needs a reshape or transpose across the tiled axes.

All matmuls use ``Precision.HIGHEST``: Mosaic rounds float32 operands to bf16 otherwise, and the state is meant to be
carried in float32 (SPEC §0.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (m, k) @ b (k, n) -> (m, n) in float32."""
    return jnp.dot(a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def matmul_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T @ b for a (k, m), b (k, n) -> (m, n) in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)


def matmul_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b^T for a (m, k), b (n, k) -> (m, n) in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)


def outer(source_rows: jax.Array, lane_row: jax.Array, src: jax.Array) -> jax.Array:
    """Per-head outer products: out[i, l] = a[slot(l), i] * b[l] for a (m, Kp), b (1, L), src (m, L) -> (Kp, L)."""
    return matmul_tn(source_rows, src * lane_row)


def contract_rows(source_rows: jax.Array, state_like: jax.Array, src: jax.Array) -> jax.Array:
    """out[l] = sum_i a[slot(l), i] * X[i, l] for a (m, Kp), X (Kp, L) -> (1, L) (readout q^T H, and dv)."""
    return jnp.sum(matmul(source_rows, state_like) * src, axis=0, keepdims=True)


def contract_lanes(state_like: jax.Array, src: jax.Array) -> jax.Array:
    """out[s, i] = sum over the lanes l reading slot s of X[i, l], for X (Kp, L) -> (m, Kp) (dq and dk)."""
    return matmul_nt(src, state_like)


def step(
    state: jax.Array, w: jax.Array, k_t: jax.Array, v_t: jax.Array, f_t: jax.Array, k_src: jax.Array, bf16_state: bool
) -> tuple[jax.Array, jax.Array]:
    """One recurrence step: Z = tanh(S W + k v^T), S' = f S + (1 - f) Z. Returns (Z, S'), both (Kp, L).

    With ``bf16_state`` the new state is rounded to bfloat16 (kept in a float32 register), which reproduces a
    bfloat16-stored state.
    """
    z = jnp.tanh(matmul(state, w) + outer(k_t, v_t, k_src))
    new_state = f_t * state + (1.0 - f_t) * z
    if bf16_state:
        new_state = new_state.astype(jnp.bfloat16).astype(jnp.float32)
    return z, new_state


def sequence_at(token: jax.Array, cu_ref, num_seqs: int, start: jax.Array) -> jax.Array:
    """Index of the packed sequence holding ``token``, searching forward from sequence ``start``.

    ``cu_ref`` (num_seqs + 1,) int32 in SMEM. Empty sequences are skipped; tokens past the last offset map to the
    last sequence.
    """

    def advance(seq):
        return seq + 1

    def inside_later(seq):
        return jnp.logical_and(seq < num_seqs - 1, cu_ref[seq + 1] <= token)

    return lax.while_loop(inside_later, advance, start)


def token_flags(token: jax.Array, cu_ref, seq: jax.Array, tokens: int) -> tuple[jax.Array, jax.Array]:
    """Whether packed ``token`` (of sequence ``seq``) starts and whether it ends its sequence; both False for the
    padding past the ``tokens`` real tokens. ``cu_ref`` (num_seqs + 1,) int32 in SMEM."""
    valid = token < tokens
    is_start = jnp.logical_and(valid, cu_ref[seq] == token)
    is_end = jnp.logical_and(valid, cu_ref[seq + 1] - 1 == token)
    return is_start, is_end
