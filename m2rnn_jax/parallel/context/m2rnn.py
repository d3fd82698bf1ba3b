"""The M2RNN op with its sequence split over the context axis (the pipeline of :mod:`.pipeline`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.ops import m2rnn
from m2rnn_jax.ops.m2rnn.validation import validate_inputs
from m2rnn_jax.ops.m2rnn.value_checks import check_input_values
from m2rnn_jax.parallel.context.axis import CONTEXT_AXIS
from m2rnn_jax.parallel.context.pipeline import context_recurrence
from m2rnn_jax.value_checks import checks_enabled


def context_m2rnn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    gradient_clipping: float | None = None,
    state_dtype: jnp.dtype = jnp.float32,
    backend: str = "auto",
    interpret: bool = False,
    check_values: bool | None = None,
    num_micro_batches: int | None = None,
    axis_name: str = CONTEXT_AXIS,
) -> tuple[jax.Array, jax.Array]:
    """:func:`m2rnn_jax.ops.m2rnn` (dense inputs) under a mesh whose ``axis_name`` axis splits the sequence.

    Same arguments, results and dtypes as the op: q (B, S, Nq, K), k (B, S, Nk, K), v (B, S, Nv, V), f (B, S, Nf),
    W (Nw, V, V), h0 (B, N, K, V) or None, reset (B, S) bool or None (document starts; the op then runs its scan
    backend) -> y (B, S, N, V), h_final (B, N, K, V); S must be a multiple of the axis size. Each shard runs the
    op (any backend; Pallas kernels inside their own shard_map over the remaining axes) on its positions,
    pipelined over micro-batches of sequences or heads (``num_micro_batches``, default chosen by
    :func:`~m2rnn_jax.parallel.context.pipeline.choose_micro_batches`); the state between shards is
    carried in ``promote_types(state_dtype, q.dtype)``, as inside the op, so the result equals the op on one device,
    gradient clipping included. ``check_values``: the op's value checks, run once on the global inputs.
    """
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("f", f, 3), ("W", W, 3)):
        if x.ndim != rank:
            raise ValueError(
                f"{name}: expected {rank} dimensions (dense inputs; varlen cannot be split over the "
                f"context axis), got shape {x.shape}"
            )
    shapes = validate_inputs(q, k, v, W, f, h0, None, reset)
    if checks_enabled(check_values):
        check_input_values(q, k, v, W, f, h0, None)
    carry_dtype = jnp.promote_types(state_dtype, q.dtype)
    shape = (shapes.batch, shapes.num_heads, shapes.k_dim, shapes.v_dim)
    start = jnp.zeros(shape, carry_dtype) if h0 is None else h0.astype(carry_dtype)

    def run(inputs, weights, h, reset):
        q, k, v, f = inputs
        return m2rnn(
            q,
            k,
            v,
            weights[0],
            f,
            h,
            reset=reset,
            gradient_clipping=gradient_clipping,
            state_dtype=state_dtype,
            backend=backend,
            interpret=interpret,
            check_values=False,
        )

    y, final = context_recurrence(
        run,
        (q, k, v, f),
        (W,),
        start,
        reset=reset,
        num_heads=shapes.num_heads,
        num_micro_batches=num_micro_batches,
        axis_name=axis_name,
    )
    return y.astype(q.dtype), final.astype(q.dtype if h0 is None else h0.dtype)
