"""Intermediates stored in a narrower dtype on purpose, kept so by XLA.

XLA's GPU compiler may keep excess precision: it drops a float32 -> bf16 -> float32 round trip and then stores the
float32 array, with twice the bytes to write and read back. Where the code rounds an activation-sized array to
halve its traffic (the conv backward's dz, the gated delta rule's output), :func:`stored_in` puts an optimization
barrier after the cast, so the array is materialized in the narrow dtype. Values are those the code states (the
rounding happens); on the GPU the barrier only fixes the storage dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.typing import Dtype


def stored_in(x: jax.Array, dtype: Dtype) -> jax.Array:
    """``x.astype(dtype)``, behind ``jax.lax.optimization_barrier`` when ``dtype`` has fewer bytes than x's dtype."""
    narrowed = jnp.dtype(dtype).itemsize < jnp.dtype(x.dtype).itemsize
    x = x.astype(dtype)
    return jax.lax.optimization_barrier(x) if narrowed else x
