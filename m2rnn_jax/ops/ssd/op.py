"""The public SSD op: argument checks, the choice between the chunked and the step-by-step form, output dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.checks import require
from m2rnn_jax.ops.ssd.chunked import ssd_chunked
from m2rnn_jax.ops.ssd.reference import ssd_recurrent
from m2rnn_jax.ops.ssd.validation import validate_inputs

BACKENDS = ("auto", "chunked", "recurrent")


def ssd(
    x: jax.Array,
    dt: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    chunk_size: int = 256,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """SSD, the state-space recurrence of Mamba2 (SPEC §9.4), per sequence and head h with state s (P, N):

        s <- 0 if reset_t;   s <- exp(log_decay_t) s + dt_t x_t B_tᵀ;   y_t = s C_t

    where head h reads B/C group h // (H / G) and ``log_decay = dt * A`` (the layer's decay gate). The D skip and
    the gating around it belong to the layer.

    Args:
      x: (B, S, H, P) float inputs.
      dt, log_decay: (B, S, H) float.
      B, C: (B, S, G, N) float, G dividing H.
      h0: (B, H, P, N) initial state, or None (zeros).
      reset: (B, S) bool or None: True where a new document starts; the state entering that position is zero.
      chunk_size: chunk length of the chunked form (it uses ``min(chunk_size, S)``).
      backend: "chunked" (matmuls inside chunks, a scan over chunks), "recurrent" (``lax.scan`` over steps, the
        reference), or "auto" (recurrent for S = 1, the decoding step; chunked otherwise).

    Returns:
      y (B, S, H, P) in x's dtype and the final state (B, H, P, N) in promote_types(float32, x.dtype); both forms
      compute in that dtype.

    Raises:
      ValueError: naming the argument, for wrong ranks, shapes, dtypes, group counts, chunk sizes or backends.
    """
    shapes = validate_inputs(x, dt, log_decay, B, C, h0, reset, chunk_size)
    require(backend in BACKENDS, "backend", f"one of {list(BACKENDS)}", backend)
    if backend == "auto":
        backend = "recurrent" if shapes.tokens == 1 else "chunked"
    state_dtype = jnp.promote_types(jnp.float32, x.dtype)
    if h0 is None:
        h0 = jnp.zeros((shapes.batch, shapes.num_heads, shapes.head_dim, shapes.state_size), state_dtype)
    inputs = [t.astype(state_dtype) for t in (x, dt, log_decay, B, C, h0)]
    if backend == "recurrent":
        y, final = ssd_recurrent(*inputs, reset)
    else:
        y, final = ssd_chunked(*inputs, chunk_size, reset)
    return y.astype(x.dtype), final.astype(state_dtype)
