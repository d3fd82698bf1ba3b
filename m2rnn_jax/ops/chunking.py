"""What the chunked forms of the decayed linear recurrences share (the gated delta rule's WY form, Mamba2's SSD).

Both split the sequence into chunks of C steps (zero-padded at the end), work on all chunks at once with the
decays inside each chunk, carry a state from chunk to chunk, and put the chunks back together. Inside a chunk,
with Γ_t = Σ_{s<=t} log a_s the cumulative log-decay, the weights they need are:

    decay_ti = e^{Γ_t - Γ_i} for i <= t (what of step i reaches step t),
    start_t  = e^{Γ_t}             (what of the chunk-start state reaches step t),
    end_i    = e^{Γ_C - Γ_i}       (what of step i reaches the chunk end),
    carry    = e^{Γ_C}             (what of the chunk-start state reaches the chunk end),

each 0 across a document reset (a new document at step t: the state entering t is zero). What each form carries
from chunk to chunk (a WY-form state update, a decayed sum) stays in its own module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """(B, S, ...) -> (B, n, C, ...) with n = ceil(S / C), zero-padding S to n C."""
    batch, seq_len = x.shape[:2]
    num_chunks = -(-seq_len // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk_size - seq_len)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])


def merge_chunks(x: jax.Array, seq_len: int) -> jax.Array:
    """(B, n, C, ...) -> (B, S, ...): the inverse of :func:`split_chunks`, dropping the padding."""
    batch, num_chunks, chunk_size = x.shape[:3]
    return x.reshape(batch, num_chunks * chunk_size, *x.shape[3:])[:, :seq_len]


def _masked_exp(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """exp(x) where ``keep``, 0 elsewhere (exp(-inf): no NaN in the value or the gradient)."""
    return jnp.exp(x) if keep is None else jnp.exp(jnp.where(keep, x, -jnp.inf))


def chunk_decays(log_decay: jax.Array, reset: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The decay weights of each chunk (module docstring), document resets folded in.

    Args:
      log_decay: (..., C) per-step log-decays of each chunk along the last axis, in the accumulation dtype.
      reset: (..., C) bool broadcastable against ``log_decay`` (True where a document starts), or None.

    Returns:
      decay (..., C, C): e^{Γ_t - Γ_i} at [t, i] for i <= t with no reset in (i, t], else 0;
      start (..., C): e^{Γ_t} before the chunk's first reset, else 0;
      end (..., C): e^{Γ_C - Γ_i} from the chunk's last reset on, else 0;
      carry (...,): e^{Γ_C} if the chunk has no reset, else 0.
    """
    gamma = jnp.cumsum(log_decay, axis=-1)
    steps = jnp.arange(log_decay.shape[-1])
    lower = steps[:, None] >= steps[None, :]
    if reset is None:
        same, first, last, whole = lower, None, None, None
    else:
        segment = jnp.cumsum(reset.astype(jnp.int32), axis=-1)  # index of the document inside the chunk
        same = lower & (segment[..., :, None] == segment[..., None, :])
        first = segment == 0
        last = segment == segment[..., -1:]
        whole = first[..., -1]
    decay = _masked_exp(gamma[..., :, None] - gamma[..., None, :], same)
    start = _masked_exp(gamma, first)
    end = _masked_exp(gamma[..., -1:] - gamma, last)
    carry = _masked_exp(gamma[..., -1], whole)
    return decay, start, end, carry
