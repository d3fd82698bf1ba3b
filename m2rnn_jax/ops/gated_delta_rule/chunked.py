"""The chunked (WY / UT transform) form of the gated delta rule, in plain ``jnp``, split into reusable stages.

Chunk length C; inside a chunk Γ_t = Σ_{s<=t} log α_s and S_0 is the state entering the chunk. Writing
S_t = α_t S_{t-1} + k_t w_tᵀ with w_t = β_t (v_t - α_t S_{t-1}ᵀ k_t) gives (I + A) W = diag(β) V - diag(β e^Γ) K S_0
with A_ti = β_t e^{Γ_t - Γ_i} k_t·k_i (i < t). One unit lower-triangular solve per chunk yields

    U = (I + A)⁻¹ diag(β) V,   Wk = (I + A)⁻¹ diag(β e^Γ) K,   Kd = diag(e^{Γ_C - Γ}) K,   a = e^{Γ_C}

for all chunks in parallel (:func:`chunk_factors`, :func:`local_factors`; T = (I + A)⁻¹ is formed explicitly). The
only sequential part walks over chunks (:func:`scan_states` here, a fused kernel in
:mod:`m2rnn_jax.ops.gated_delta_rule.pallas_gpu`):

    W_c = U_c - Wk_c S_c,   S_{c+1} = a_c S_c + Kd_cᵀ W_c

and the outputs are parallel again (:func:`chunk_outputs`, :func:`xla_outputs`):
O_c = diag(e^Γ) Q S_c + (Q Kᵀ ⊙ e^{Γ_t - Γ_i} [i <= t]) W_c.

Resets (a new document at position t: the state entering step t is zero) are folded into the chunk-local factors:
a pairwise decay e^{Γ_t - Γ_i} across a reset becomes 0, the chunk-start factor e^{Γ_t} becomes 0 from the first
reset of the chunk on, and the carry factors (Kd's e^{Γ_C - Γ_i} and a) become 0 before the chunk's last reset.
Ragged lengths are zero-padded at the end (β = 0, log α = 0 leave the state untouched). The chunking and these
decay weights are shared with SSD (:mod:`m2rnn_jax.ops.chunking`); the WY-form state update is this module's.

Layout of the chunked tensors: (B, H, n, C, ...) with n = ceil(S / C) chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.chunking import chunk_decays, merge_chunks, split_chunks
from m2rnn_jax.ops.rounding import stored_in

HIGHEST = jax.lax.Precision.HIGHEST

# inverse(A) -> (I + A)⁻¹ for A (..., C, C) strictly lower triangular
Inverse = Callable[[jax.Array], jax.Array]
# local(q, k, v, beta, decay, start, end) -> (U, Wk, Kd, Qd, QK): :func:`local_factors` or a fused equivalent
LocalFactors = Callable[..., tuple[jax.Array, ...]]
# states(U, Wk, Kd, a, h0) -> (W (B, H, n, C, V), chunk-start states (B, H, n, K, V), final state (B, H, K, V))
States = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
# outputs(Qd, QK, starts, W, out_dtype) -> O (B, n, C, H, V) in out_dtype: :func:`xla_outputs` or a fused equivalent
Outputs = Callable[..., jax.Array]


class ChunkFactors(NamedTuple):
    """Chunk-local factors, all chunks at once (shapes for B, H, n chunks of C; accumulation dtype)."""

    U: jax.Array  # (B, H, n, C, V)
    Wk: jax.Array  # (B, H, n, C, K)
    Kd: jax.Array  # (B, H, n, C, K): diag(e^{Γ_C - Γ}) K
    carry: jax.Array  # (B, H, n): a_c, the decay of the chunk-start state over the whole chunk
    Qd: jax.Array  # (B, H, n, C, K): diag(e^Γ) Q
    QK: jax.Array  # (B, H, n, C, C): Q Kᵀ ⊙ e^{Γ_t - Γ_i} [i <= t]


def matmul(
    equation: str, a: jax.Array, b: jax.Array, dot_dtype: jnp.dtype, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """einsum with both operands cast to ``dot_dtype``, a float32 (float64 for float64) accumulator and the result
    in ``out_dtype`` (default: the accumulator's dtype). Its gradient products also take ``dot_dtype`` operands."""
    out = _einsum_wide(equation, a.astype(dot_dtype), b.astype(dot_dtype))
    return out if out_dtype is None else out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_wide(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum of two operands of one dtype with a >= float32 result. Plain autodiff would multiply the float32
    cotangent with a 16-bit operand, promoted to float32 products (no bf16 matrix units); the VJP here rounds the
    cotangent to the operands' dtype first (the operand cotangents have that dtype anyway)."""
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.promote_types(jnp.float32, a.dtype), precision=HIGHEST)


def _einsum_wide_forward(equation, a, b):
    return _einsum_wide(equation, a, b), (a, b)


def _einsum_wide_backward(equation, residuals, cotangent):
    a, b = residuals
    a_spec, b_spec, out_spec = _two_operand_specs(equation)
    g = cotangent.astype(a.dtype)
    return _product_in_order(out_spec, g, b_spec, b, a_spec), _product_in_order(a_spec, a, out_spec, g, b_spec)


def _two_operand_specs(equation: str) -> tuple[str, str, str]:
    """The subscripts after the shared leading batch dims: ``"...ab,...bc->...ac"`` -> ``("ab", "bc", "ac")``."""
    operands, out = equation.split("->")
    a, b = operands.split(",")
    specs = tuple(spec.removeprefix("...") for spec in (a, b, out))
    if any(len(spec) != 2 for spec in specs) or not all(x.startswith("...") for x in (a, b, out)):
        raise ValueError(f"equation: expected the form '...xy,...yz->...xz' (any letters), got {equation!r}")
    return specs


def _product_in_order(x_spec: str, x: jax.Array, y_spec: str, y: jax.Array, target: str) -> jax.Array:
    """einsum(x, y -> target) for two (..., 2-dim) operands that each give ``target`` one dimension, with the
    operands in the order whose dot_general output is ``target`` as it stands: the batch dims, then the first
    operand's free dim, then the second's. The order einsum's autodiff picks instead gives one operand's cotangent
    as (..., second, first) and a transpose after the product: in the GDN op's backward, copies of the (B, H, n, K, V)
    chunk-start states and of two (B, H, n, C, V) cotangents (13.6 ms of the 400M 1L hybrid's H200 step,
    experiments/RESULTS.md, session 11)."""
    for (first_spec, first), (second_spec, second) in (((x_spec, x), (y_spec, y)), ((y_spec, y), (x_spec, x))):
        free = [c for c in first_spec if c not in second_spec] + [c for c in second_spec if c not in first_spec]
        if "".join(free) == target:
            return jnp.einsum(f"...{first_spec},...{second_spec}->...{target}", first, second, precision=HIGHEST)
    raise ValueError(f"einsum: no operand order of {x_spec!r}, {y_spec!r} gives {target!r}")


_einsum_wide.defvjp(_einsum_wide_forward, _einsum_wide_backward)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """(B, S, H, ...) -> (B, H, n, C, ...), zero-padding S to n C."""
    return jnp.moveaxis(split_chunks(x, chunk_size), 3, 1)


def chunk_factors(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    reset: jax.Array | None,
    *,
    local: LocalFactors,
) -> ChunkFactors:
    """Chunk-local factors from q, k (B, n, C, H, K), v (B, n, C, H, V) (split into chunks, heads where they were:
    :func:`m2rnn_jax.ops.chunking.split_chunks`), beta, log_alpha (B, H, n, C), reset (B, 1, n, C) or None: the
    decay weights of :func:`m2rnn_jax.ops.chunking.chunk_decays`, then ``local`` (:func:`local_factors` with an
    inverse and a product dtype, or a fused equivalent)."""
    decay, start, end, carry = chunk_decays(log_alpha, reset)
    U, Wk, Kd, Qd, QK = local(q, k, v, beta, decay, start, end)
    return ChunkFactors(U=U, Wk=Wk, Kd=Kd, carry=carry, Qd=Qd, QK=QK)


def local_factors(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    decay: jax.Array,
    start: jax.Array,
    end: jax.Array,
    *,
    inverse: Inverse,
    dot_dtype: jnp.dtype,
) -> tuple[jax.Array, ...]:
    """(U, Wk, Kd, Qd, QK) (B, H, n, C, ...) of every chunk from q, k (B, n, C, H, K), v (B, n, C, H, V), beta,
    start, end (B, H, n, C) and decay (B, H, n, C, C) (the last three from
    :func:`m2rnn_jax.ops.chunking.chunk_decays`).

    Products take ``dot_dtype`` operands with a >= float32 accumulator; U, Wk, Kd, Qd come out in ``dot_dtype``
    (the operands of the walk and the outputs), QK in the dtype of beta / decay. The diagonal scalings of the
    right-hand sides are applied to the columns of T = (I + A)⁻¹ (C x C) instead of to V and K.
    """
    q, k, v = (jnp.moveaxis(x, 3, 1) for x in (q, k, v))  # heads first: (B, H, n, C, ...)
    steps = jnp.arange(q.shape[-2])
    strict = steps[:, None] > steps[None, :]
    A = jnp.where(strict, beta[..., :, None] * matmul("...tk,...ik->...ti", k, k, dot_dtype) * decay, 0.0)
    T = inverse(A)
    return (
        matmul("...ti,...iv->...tv", T * beta[..., None, :], v, dot_dtype, out_dtype=dot_dtype),
        matmul("...ti,...ik->...tk", T * (beta * start)[..., None, :], k, dot_dtype, out_dtype=dot_dtype),
        (k * end[..., None]).astype(dot_dtype),
        (q * start[..., None]).astype(dot_dtype),
        matmul("...tk,...ik->...ti", q, k, dot_dtype) * decay,
    )


def triangular_inverse(A: jax.Array) -> jax.Array:
    """(I + A)⁻¹ by XLA's triangular solve against the identity (the reference)."""
    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
    return jax.lax.linalg.triangular_solve(A, eye, left_side=True, lower=True, unit_diagonal=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unit_lower_inverse(A: jax.Array, precision: jax.lax.Precision = HIGHEST) -> jax.Array:
    """(I + A)⁻¹ for A (..., C, C) strictly lower triangular, C a power of two, by block doubling in matmuls.

    With T_b the inverse of the block-diagonal part of I + A in blocks of b, the blocks of 2b are
    [[T11, 0], [-T22 A21 T11, T22]], so T_2b = T_b - T_b M_b T_b where M_b keeps A's (odd, even) sub-blocks of
    size b inside each block of 2b. Exact block substitution (no Neumann-series cancellation); log2(C) levels of
    two matmuls at ``precision``. The gradient is the closed form dA = -strict_lower(Tᵀ dT Tᵀ) (two matmuls).
    """
    size = A.shape[-1]
    if size & (size - 1):
        raise ValueError(f"A: expected a power-of-two chunk length, got {size}")
    rows = jnp.arange(size)
    T = jnp.broadcast_to(jnp.eye(size, dtype=A.dtype), A.shape)
    b = 1
    while b < size:
        sub = (rows[:, None] // (2 * b) == rows[None, :] // (2 * b)) & (rows[:, None] // b > rows[None, :] // b)
        M = jnp.where(sub, A, 0.0)
        T = T - jnp.matmul(T, jnp.matmul(M, T, precision=precision), precision=precision)
        b *= 2
    return T


def _inverse_forward(A, precision):
    T = unit_lower_inverse(A, precision)
    return T, T


def _inverse_backward(precision, T, dT):
    Tt = jnp.swapaxes(T, -1, -2)
    dA = -jnp.matmul(jnp.matmul(Tt, dT, precision=precision), Tt, precision=precision)
    return (jnp.tril(dA, -1),)


unit_lower_inverse.defvjp(_inverse_forward, _inverse_backward)


def scan_states(
    U: jax.Array, Wk: jax.Array, Kd: jax.Array, carry: jax.Array, h0: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The walk over chunks with ``lax.scan`` (the reference of the fused kernel).

    U (B, H, n, C, V), Wk, Kd (B, H, n, C, K), carry (B, H, n), h0 (B, H, K, V)
    -> W (B, H, n, C, V), chunk-start states (B, H, n, K, V), final state (B, H, K, V).
    """

    def step(state, inputs):
        U_c, Wk_c, Kd_c, a_c = inputs
        w = U_c - jnp.matmul(Wk_c, state, precision=HIGHEST)
        nxt = a_c[..., None, None] * state + jnp.matmul(jnp.swapaxes(Kd_c, -1, -2), w, precision=HIGHEST)
        return nxt, (w, state)

    final, (w, starts) = jax.lax.scan(step, h0, [jnp.moveaxis(x, 2, 0) for x in (U, Wk, Kd, carry)])
    return jnp.moveaxis(w, 0, 2), jnp.moveaxis(starts, 0, 2), final


def chunk_outputs(Qd: jax.Array, QK: jax.Array, starts: jax.Array, w: jax.Array, dot_dtype: jnp.dtype) -> jax.Array:
    """O_c = Qd_c S_c + QK_c W_c for all chunks: (B, H, n, C, V) in the accumulation dtype."""
    return matmul("...ck,...kv->...cv", Qd, starts, dot_dtype) + matmul("...ti,...iv->...tv", QK, w, dot_dtype)


def xla_outputs(
    Qd: jax.Array, QK: jax.Array, starts: jax.Array, w: jax.Array, out_dtype: jnp.dtype, *, dot_dtype: jnp.dtype
) -> jax.Array:
    """:func:`chunk_outputs` rounded to ``out_dtype`` and token-major: (B, n, C, H, V), the (B, S, H, V) layout
    split into chunks."""
    # rounded before the transpose (fewer bytes), and kept so (stored_in: XLA's GPU compiler otherwise stores o in
    # float32 for the transpose and the layer's output norm, session 12's H200 profile)
    return jnp.moveaxis(stored_in(chunk_outputs(Qd, QK, starts, w, dot_dtype), out_dtype), 1, 3)


def run_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array,
    reset: jax.Array | None,
    *,
    chunk_size: int,
    local: LocalFactors,
    states: States,
    outputs: Outputs,
) -> tuple[jax.Array, jax.Array]:
    """The three stages on (B, S, H, ...) inputs: chunk factors (``local``: :func:`chunk_factors`), the walk
    ``states``, the ``outputs``.

    Returns o (B, S, H, V) in q's dtype and the final state in the dtype ``states`` gives it.
    """
    seq_len = q.shape[1]
    q, k, v = (split_chunks(x, chunk_size) for x in (q, k, v))  # (B, n, C, H, ...): the local stage's layout
    beta, log_alpha = (to_chunks(x, chunk_size) for x in (beta, log_alpha))
    if reset is not None:
        reset = to_chunks(reset[..., None], chunk_size)  # (B, 1, n, C)
    f = chunk_factors(q, k, v, beta, log_alpha, reset, local=local)
    w, starts, final = states(f.U, f.Wk, f.Kd, f.carry, h0)
    return merge_chunks(outputs(f.Qd, f.QK, starts, w, q.dtype), seq_len), final


def gated_delta_rule_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array,
    reset: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """The chunked reference: everything in ``promote_types(float32, q.dtype)``, XLA's triangular solve and a
    ``lax.scan`` over chunks of ``min(chunk_size, S)``. Arguments and results as
    :func:`m2rnn_jax.ops.gated_delta_rule.recurrent.gated_delta_rule_recurrent`."""
    dtype = jnp.promote_types(jnp.float32, q.dtype)
    q, k, v, beta, log_alpha, h0 = (x.astype(dtype) for x in (q, k, v, beta, log_alpha, h0))
    return run_chunked(
        q,
        k,
        v,
        beta,
        log_alpha,
        h0,
        reset,
        chunk_size=min(chunk_size, q.shape[1]),
        local=functools.partial(local_factors, inverse=triangular_inverse, dot_dtype=dtype),
        states=scan_states,
        outputs=functools.partial(xla_outputs, dot_dtype=dtype),
    )
