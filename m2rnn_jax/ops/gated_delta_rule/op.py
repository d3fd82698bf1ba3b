"""The public gated delta rule op: argument checks, backend resolution and the output-dtype contract."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.gated_delta_rule.chunked import gated_delta_rule_chunked
from m2rnn_jax.ops.gated_delta_rule.recurrent import gated_delta_rule_recurrent
from m2rnn_jax.ops.platform import on_nvidia_gpu

BACKENDS = ("auto", "chunked", "recurrent", "pallas_gpu")


def _shape(x: jax.Array) -> str:
    return str(tuple(int(d) for d in x.shape))


def _check_float(name: str, x: jax.Array, layout: str, expected: tuple[int, ...] | None) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if x.ndim != len(layout.split(",")):
        raise ValueError(f"{name}: expected shape {layout}, got {_shape(x)}")
    if expected is not None and tuple(x.shape) != expected:
        raise ValueError(f"{name}: expected shape {layout} = {expected}, got {_shape(x)}")


def validate_inputs(q, k, v, beta, log_alpha, h0, reset, chunk_size) -> None:
    """Raise ValueError naming the argument, the expected and the actual shape / dtype / value."""
    _check_float("q", q, "(B, S, H, K)", None)
    B, S, H, K = q.shape
    _check_float("k", k, "(B, S, H, K)", (B, S, H, K))
    _check_float("v", v, "(B, S, H, V)", None)
    if v.shape[:3] != (B, S, H):
        raise ValueError(f"v: expected shape (B, S, H, V) with (B, S, H) = {(B, S, H)} as in q, got {_shape(v)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _check_float("beta", beta, "(B, S, H)", (B, S, H))
    _check_float("log_alpha", log_alpha, "(B, S, H)", (B, S, H))
    if h0 is not None:
        _check_float("h0", h0, "(B, H, K, V)", (B, H, K, v.shape[-1]))
    if reset is not None and (reset.dtype != jnp.bool_ or tuple(reset.shape) != (B, S)):
        raise ValueError(f"reset: expected a bool array of shape (B, S) = {(B, S)}, got {reset.dtype} {_shape(reset)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def _fused_module():
    return importlib.import_module("m2rnn_jax.ops.gated_delta_rule.pallas_gpu")


def resolve_backend(backend: str, k_dim: int, v_dim: int, chunk_size: int, dtype: jnp.dtype) -> str:
    """Map ``backend`` to a concrete one: "auto" is "pallas_gpu" on an NVIDIA GPU (default device) when the fused
    backend takes these sizes and dtype
    (:func:`~m2rnn_jax.ops.gated_delta_rule.pallas_gpu.fused_unsupported_reason`), else
    "chunked"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if on_nvidia_gpu() and _fused_module().fused_unsupported_reason(k_dim, v_dim, chunk_size, dtype) is None:
        return "pallas_gpu"
    return "chunked"


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule (Gated DeltaNet, SPEC §9.4), per sequence and head with state S (K, V):

        S <- 0 if reset_t;   S <- exp(log_alpha_t) S;   w_t = beta_t (v_t - Sᵀ k_t);   S <- S + k_t w_tᵀ;
        o_t = Sᵀ q_t

    Args:
      q, k: (B, S, H, K), already L2-normalised (q scaled).
      v: (B, S, H, V), same dtype as q and k.
      beta, log_alpha: (B, S, H) float (any float dtype; computed in >= float32).
      h0: (B, H, K, V) initial state, or None (zeros).
      reset: (B, S) bool or None: True where a new document starts; the state entering that position is zero
        (h0 therefore applies to position 0 only unless reset[:, 0]).
      chunk_size: chunk length of the chunked forms ("chunked" uses min(chunk_size, S); "pallas_gpu" needs a power
        of two >= 16 and pads S).
      backend: "chunked" (jnp WY form, the reference), "recurrent" (``lax.scan`` over steps), "pallas_gpu"
        (Pallas-Triton kernels, forward and backward: every stage for 16-bit inputs, the inverse and the walk over
        chunks around XLA matmuls for float32), or "auto"
        (pallas_gpu on an NVIDIA GPU when K, V, chunk_size are powers of two >= 16 and the dtype is bf16 / f16 /
        f32; chunked otherwise).
      interpret: run the Pallas kernels in interpret mode (CPU testing); only with backend "pallas_gpu".

    Returns:
      o (B, S, H, V) in q's dtype and h_final (B, H, K, V) in float32 (float64 for float64 inputs).
      The reference backends compute in promote_types(float32, q.dtype); pallas_gpu takes products with q's dtype
      as operands and float32 accumulation, and carries the state in float32.

    Raises:
      ValueError: naming the argument, for wrong ranks, shapes, dtypes, chunk sizes, unknown backends, sizes the
        chosen backend cannot take, or ``interpret`` with a non-Pallas backend.
    """
    validate_inputs(q, k, v, beta, log_alpha, h0, reset, chunk_size)
    name = resolve_backend(backend, q.shape[-1], v.shape[-1], chunk_size, q.dtype)
    if interpret and name != "pallas_gpu":
        raise ValueError(f"interpret: True needs backend 'pallas_gpu', got {name!r}")
    state_dtype = jnp.promote_types(jnp.float32, q.dtype)
    if h0 is None:
        h0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), state_dtype)
    if name == "pallas_gpu":
        o, final = _fused_module().gated_delta_rule_pallas_gpu(
            q, k, v, beta, log_alpha, h0, reset, chunk_size=chunk_size, interpret=interpret
        )
    elif name == "chunked":
        o, final = gated_delta_rule_chunked(q, k, v, beta, log_alpha, h0, reset, chunk_size)
    else:
        inputs = (x.astype(state_dtype) for x in (q, k, v, beta, log_alpha, h0))
        o, final = gated_delta_rule_recurrent(*inputs, reset)
    return o.astype(q.dtype), final.astype(state_dtype)
