"""The public M2RNN op: validation, backend dispatch and the output-dtype contract."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.clipping import normalize_clipping
from m2rnn_jax.ops.m2rnn.backends import PALLAS_BACKENDS, get_backend, resolve_backend_name
from m2rnn_jax.ops.m2rnn.sharding import run_sharded
from m2rnn_jax.ops.m2rnn.validation import state_dtypes, validate_inputs
from m2rnn_jax.ops.m2rnn.value_checks import check_input_values
from m2rnn_jax.typing import Interpret
from m2rnn_jax.value_checks import checks_enabled


def m2rnn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None = None,
    *,
    cu_seqlens: jax.Array | None = None,
    reset: jax.Array | None = None,
    gradient_clipping: float | None = None,
    state_dtype: jnp.dtype = jnp.float32,
    backend: str = "auto",
    interpret: Interpret = False,
    check_values: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The M2RNN recurrence (Matrix-to-Matrix RNN, arXiv 2603.14360), per sequence and head n:

        Z_t = tanh(H_{t-1} W + k_t v_t^T)          H_t (K, V), W (V, V), k_t (K,), v_t (V,)
        H_t = f_t H_{t-1} + (1 - f_t) Z_t          f_t a scalar forget value in (0, 1]
        y_t = H_t^T q_t                            y_t (V,), read from the new state

    Dense inputs:
        q (B, S, Nq, K), k (B, S, Nk, K), v (B, S, Nv, V), f (B, S, Nf), W (Nw, V, V), h0 (B, N, K, V) or None
        -> y (B, S, N, V), h_final (B, N, K, V)
    Varlen inputs (``cu_seqlens`` given): B sequences packed along T tokens,
        q (T, Nq, K), k (T, Nk, K), v (T, Nv, V), f (T, Nf), cu_seqlens (B+1,) int offsets, 0 first and T last;
        sequence b covers tokens [cu_seqlens[b], cu_seqlens[b+1]) and starts from h0[b]
        -> y (T, N, V), h_final (B, N, K, V) (an empty sequence returns its h0).
        A concrete ``cu_seqlens`` with bad offsets raises ValueError here. Under ``jax.jit`` the offsets are traced
        and nothing looks at them: a decreasing ``cu_seqlens`` (or one not starting at 0 / ending at T) raises
        nothing and gives meaningless outputs. ``check_values=True`` catches it when the program runs.

    Document resets (``reset`` (B, S) bool, dense inputs only): where ``reset[b, t]`` is set, the state entering
    step t of sequence b is zero instead of H_{t-1} (h0 when t = 0): a new document starts there, and its outputs,
    the final state and every gradient equal those of running that document alone from a zero state (the clamped
    cotangent of SPEC §0.1 does not flow into the earlier document). Only the "scan" backend implements it; a call
    with ``reset`` and a Pallas backend (or "auto" resolving to one) runs the scan backend instead: the fused
    kernels have no in-sequence reset, and their varlen form would need a static bound on the number of documents
    (one slot per token, whose checkpoints exceed the kernels' int32 indexing at training shapes).

    Heads: N = max(Nq, Nk, Nv, Nf, Nw) and each count must divide N; output head n reads source head
    n // (N / N_x) of every input (contiguous blocks, ``repeat_interleave``). The paper uses Nq = Nk = 1.

    Precision: the state is carried in ``promote_types(state_dtype, q.dtype)`` (float32 for bf16/f32 inputs by
    default, float64 for float64 inputs); the arithmetic of each step uses at least float32 and tanh is exact.
    ``state_dtype=jnp.bfloat16`` with bf16 inputs reproduces the upstream kernels' bf16 state. y has q's dtype;
    h_final has h0's dtype when h0 is given, otherwise q's dtype. q, k, v must share one float dtype; f, W and h0
    may have other float dtypes.

    Gradient clipping (``gradient_clipping=c``, the fused-kernel semantics): walking backward, the state cotangent
    arriving from step t+1, and the cotangent of h_final, are clamped element-wise to [-|c|, |c|] before the readout
    term q_t dy_t^T is added; the forward pass is unchanged and dh0 is not clamped. None disables it.

    Backends: "scan" (``lax.scan`` reference, any platform), "pallas_gpu" (fused kernels for NVIDIA GPUs),
    "pallas_tpu" (fused Mosaic TPU kernels), "auto" (pallas_gpu on NVIDIA GPUs, pallas_tpu on TPU, scan elsewhere,
    judged by the default device; float64 inputs always get scan, and so do float32 inputs with V > 16 on NVIDIA
    GPUs, where the scan was measured faster). ``interpret=True`` runs a Pallas backend in
    interpret mode (on CPU; pallas_tpu also takes a ``pltpu.InterpretParams``). Under a mesh (``jax.set_mesh``) a
    Pallas backend runs inside ``jax.shard_map``: batch split over the mesh's data/fsdp/expert axes, heads over
    ``tensor``, no communication in the recurrence (:mod:`m2rnn_jax.ops.m2rnn.sharding`); axes a caller's
    ``shard_map`` already made manual are left alone.

    Raises ValueError naming the argument and the expected and actual shape/value for wrong ranks, mismatched
    B/S/T, K or V, head counts that do not divide N, bad ``cu_seqlens``, non-float dtypes, unknown backends.

    Value checks (``check_values=True``, or ``None`` and the environment variable ``M2RNN_JAX_CHECKS=1``, read when
    the call is traced; off by default, and then the traced program holds nothing extra): f in (0, 1] (NaN fails);
    q, k, v, W and h0 finite; ``cu_seqlens`` 0 first, non-decreasing and T last. A failure names the argument, the
    first offending value and its index, e.g. ``f: expected values in (0, 1], got 2.0 at index (0, 3, 1)``. With
    concrete inputs the call raises it as ``checkify.JaxRuntimeError`` (a ValueError); under ``jax.jit`` /
    ``grad`` / ``vmap`` a ``jax.debug.callback`` raises it when the program runs, so the jitted call (or the first
    ``block_until_ready`` of its outputs) raises ``jax.errors.JaxRuntimeError`` whose message ends with that line
    (:mod:`m2rnn_jax.value_checks`, ``docs/value_checks.md``). The caller needs no ``checkify`` of its own.
    """
    shapes = validate_inputs(q, k, v, W, f, h0, cu_seqlens, reset)
    if checks_enabled(check_values):
        check_input_values(q, k, v, W, f, h0, cu_seqlens)
    clip = normalize_clipping(gradient_clipping)
    state_dtypes(state_dtype, q.dtype)  # validates state_dtype
    name = resolve_backend_name(backend, q.dtype, shapes.v_dim)
    if interpret and name not in PALLAS_BACKENDS:
        raise ValueError(f"interpret: True needs a Pallas backend ({', '.join(PALLAS_BACKENDS)}), got {name!r}")
    if reset is not None:  # only the scan backend resets inside a sequence (docstring)
        y, h_final = get_backend("scan")(
            q,
            k,
            v,
            W,
            f,
            h0,
            cu_seqlens=None,
            gradient_clipping=clip,
            state_dtype=jnp.dtype(state_dtype),
            interpret=False,
            reset=reset,
            shapes=shapes,
        )
        return _cast_outputs(y, h_final, q, h0)
    backend_fn = get_backend(name)
    if name in PALLAS_BACKENDS:  # opaque custom calls: split over the mesh by hand (XLA partitions the scan itself)
        backend_fn = functools.partial(run_sharded, backend_fn)
    y, h_final = backend_fn(
        q,
        k,
        v,
        W,
        f,
        h0,
        cu_seqlens=cu_seqlens,
        gradient_clipping=clip,
        state_dtype=jnp.dtype(state_dtype),
        interpret=interpret,
        shapes=shapes,
    )
    return _cast_outputs(y, h_final, q, h0)


def _cast_outputs(y: jax.Array, h_final: jax.Array, q: jax.Array, h0: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The output-dtype contract: y in q's dtype, h_final in h0's dtype (q's when h0 is None)."""
    final_dtype = q.dtype if h0 is None else h0.dtype
    return y.astype(q.dtype), h_final.astype(final_dtype)
