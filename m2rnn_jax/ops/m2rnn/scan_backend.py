"""The "scan" backend: the ``lax.scan`` reference, registered under the common backend signature."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.m2rnn.backends import register_backend
from m2rnn_jax.ops.m2rnn.reference import m2rnn_scan_dense, m2rnn_scan_varlen
from m2rnn_jax.ops.m2rnn.validation import M2RNNShapes


def scan_backend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    *,
    cu_seqlens: jax.Array | None,
    gradient_clipping: float | None,
    state_dtype: jnp.dtype,
    interpret: bool,
    reset: jax.Array | None = None,
    shapes: M2RNNShapes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The backend function (validated inputs; see ``m2rnn_jax.ops.m2rnn.op.m2rnn``).

    ``reset`` (B, S) only when dense; ``shapes`` as ``validate_inputs`` returned them (None: validated here)."""
    if interpret:
        raise ValueError('interpret: True is only meaningful for a Pallas backend, got backend="scan"')
    if cu_seqlens is None:
        return m2rnn_scan_dense(
            q, k, v, W, f, h0, gradient_clipping=gradient_clipping, state_dtype=state_dtype, reset=reset, shapes=shapes
        )
    return m2rnn_scan_varlen(
        q, k, v, W, f, h0, cu_seqlens, gradient_clipping=gradient_clipping, state_dtype=state_dtype, shapes=shapes
    )


register_backend("scan", scan_backend)
