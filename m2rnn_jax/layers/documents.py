"""Document boundaries inside a packed row (SPEC §0.5, ``data.mask_documents``), shared by every sequence mixer.

``segment_ids`` (B, S) ints: a new document starts at position t > 0 where ``segment_ids[:, t] !=
segment_ids[:, t - 1]``; position 0 of a call continues the given state (cache). At a new document a mixer's
recurrent state and its conv tail are zero, exactly as if the document were run alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """segment_ids (B, S) ints -> (B, S) bool, True at every t > 0 whose id differs from the id at t - 1.

    Raises ValueError naming ``segment_ids`` when its shape is not (batch, seq_len) or its dtype is not integer.
    """
    if tuple(segment_ids.shape) != (batch, seq_len):
        raise ValueError(f"segment_ids: expected shape (B, S) = {(batch, seq_len)}, got {tuple(segment_ids.shape)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected an integer array, got dtype {segment_ids.dtype}")
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), dtype=jnp.bool_), changed], axis=1)


def document_index(segment_ids: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """(B, S) int32: how many documents started at or before t in this call (0 for the one continuing the state)."""
    return jnp.cumsum(document_starts(segment_ids, batch, seq_len), axis=1, dtype=jnp.int32)
