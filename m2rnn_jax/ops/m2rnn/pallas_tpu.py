"""The "pallas_tpu" backend: the fused Mosaic TPU kernels of ``pallas_kernels.tpu`` behind a ``jax.custom_vjp``.

The forward kernel saves the state at every chunk boundary; the backward kernel recomputes each chunk from its
checkpoint and walks it in reverse (memory O(S / C) states). Head broadcasting is handled by the kernel functions
(q and k are read per head block as source heads; v, f and W are repeated to N heads) and the kernels' partial
gradients are summed back onto the source heads by XLA after the kernels (no atomics on TPU).
The kernels compute in float32; float64 inputs are refused (use backend="scan"), and ``state_dtype=bfloat16`` with
bf16 inputs rounds the carried state to bf16 after every step, as the reference does (its backward treats that
rounding as the identity).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.m2rnn.backends import register_backend
from m2rnn_jax.ops.m2rnn.validation import M2RNNShapes, resolve_shapes, state_dtypes
from m2rnn_jax.typing import Interpret
from pallas_kernels.tpu.m2rnn_backward import m2rnn_backward
from pallas_kernels.tpu.m2rnn_forward import m2rnn_forward


@dataclasses.dataclass(frozen=True)
class _Static:
    """Non-differentiable settings of one call (hashable, for ``nondiff_argnums``)."""

    gradient_clipping: float | None
    bf16_state: bool
    chunk_size: int | None
    interpret: Interpret
    num_heads: int


def _forward(static: _Static, q, k, v, w, f, h0, cu_seqlens, save_checkpoints: bool):
    return m2rnn_forward(
        q,
        k,
        v,
        w,
        f,
        h0,
        cu_seqlens=cu_seqlens,
        num_heads=static.num_heads,
        chunk_size=static.chunk_size,
        bf16_state=static.bf16_state,
        save_checkpoints=save_checkpoints,
        interpret=static.interpret,
    )


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _m2rnn_tpu(static: _Static, q, k, v, w, f, h0, cu_seqlens):
    y, final, _ = _forward(static, q, k, v, w, f, h0, cu_seqlens, save_checkpoints=False)
    return y, final


def _m2rnn_tpu_fwd(static: _Static, q, k, v, w, f, h0, cu_seqlens):
    y, final, checkpoints = _forward(static, q, k, v, w, f, h0, cu_seqlens, save_checkpoints=True)
    return (y, final), (q, k, v, w, f, h0, cu_seqlens, checkpoints)


def _m2rnn_tpu_bwd(static: _Static, residuals, cotangents):
    q, k, v, w, f, h0, cu_seqlens, checkpoints = residuals
    dy, dfinal = cotangents
    dq, dk, dv, df, dw, dh0 = m2rnn_backward(
        q,
        k,
        v,
        w,
        f,
        h0,
        checkpoints,
        dy,
        dfinal,
        cu_seqlens=cu_seqlens,
        num_heads=static.num_heads,
        chunk_size=static.chunk_size,
        gradient_clipping=static.gradient_clipping,
        bf16_state=static.bf16_state,
        interpret=static.interpret,
    )
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        dw.astype(w.dtype),
        df.astype(f.dtype),
        None if h0 is None else dh0.astype(h0.dtype),
        None,
    )


_m2rnn_tpu.defvjp(_m2rnn_tpu_fwd, _m2rnn_tpu_bwd)


def _no_tokens(shapes: M2RNNShapes, y_dtype: jnp.dtype, h0: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Zero time steps: an empty y and the initial states (zeros when h0 is None)."""
    lead = (shapes.tokens,) if shapes.varlen else (shapes.batch, shapes.tokens)
    y = jnp.zeros(lead + (shapes.num_heads, shapes.v_dim), y_dtype)
    if h0 is None:
        return y, jnp.zeros((shapes.batch, shapes.num_heads, shapes.k_dim, shapes.v_dim), jnp.float32)
    return y, h0.astype(jnp.float32)


def m2rnn_pallas_tpu(
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
    interpret: Interpret,
    shapes: M2RNNShapes | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Backend entry point (validated inputs with their original head counts; see ``m2rnn_jax.ops.m2rnn.op.m2rnn``).

    Returns y in q's dtype and the final state in float32. ``interpret``: False (compile for TPU), True (TPU
    interpret mode on CPU) or a ``jax.experimental.pallas.tpu.InterpretParams``. ``chunk_size`` (a multiple of 8,
    default 64 capped by the length) is the number of time steps per grid step and per checkpoint. ``shapes``: the
    sizes ``validate_inputs`` returned (None: validated here).
    """
    shapes = resolve_shapes(shapes, q, k, v, W, f, h0, cu_seqlens)
    storage, compute = state_dtypes(state_dtype, q.dtype)
    if compute != jnp.float32:
        raise ValueError(
            f"state_dtype / input dtype: backend 'pallas_tpu' computes in float32, got inputs {q.dtype} with "
            f"state_dtype {jnp.dtype(state_dtype)} (arithmetic in {compute}); use backend='scan' for float64"
        )
    static = _Static(
        gradient_clipping=gradient_clipping,
        bf16_state=storage == jnp.bfloat16,
        chunk_size=chunk_size,
        interpret=interpret,
        num_heads=shapes.num_heads,
    )
    if shapes.tokens == 0:
        return _no_tokens(shapes, q.dtype, h0)
    return _m2rnn_tpu(static, q, k, v, W, f, h0, cu_seqlens)


register_backend("pallas_tpu", m2rnn_pallas_tpu)
