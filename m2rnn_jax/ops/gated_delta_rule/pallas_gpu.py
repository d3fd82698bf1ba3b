"""The "pallas_gpu" backend of the gated delta rule: Pallas-Triton kernels for every stage (16-bit inputs), or the
chunk-local stages in XLA around the inverse and walk kernels (float32 inputs; :func:`resolve_stages`).

The chunk-local factors (:func:`m2rnn_jax.ops.gated_delta_rule.chunked.chunk_factors`) and the outputs are batched
XLA matmuls with operands in the input dtype (bf16 / f16 / f32) and float32 accumulation; the triangular inverse is
the block doubling of :func:`~m2rnn_jax.ops.gated_delta_rule.chunked.unit_lower_inverse`, run by the kernels of
:mod:`pallas_kernels.gpu.unit_lower_inverse` (one program per chunk matrix, the levels in registers; its closed-form
gradient likewise) unless ``inverse`` asks for XLA's matmuls or triangular solve. With ``local="fused"`` (the
default for 16-bit inputs) the whole chunk-local stage is one kernel instead, its backward another with
``local_backward="fused"`` (:func:`fused_local_factors`, :mod:`pallas_kernels.gpu.gdn_chunk_factors`). Only the
walk over chunks is
sequential: the fused kernels of :mod:`pallas_kernels.gpu.gdn_chunk_states`, wrapped in a ``jax.custom_vjp`` whose
backward runs the reverse kernel and leaves the parallel cotangents to einsums (module docstring there), or with
``walk_cotangents="fused"`` to one kernel (:mod:`pallas_kernels.gpu.gdn_walk_cotangents`):

    dU = dW,   dWk_c = -dW_c S_cᵀ,   dKd_c = W_c G_{c+1}ᵀ,   da_c = <G_{c+1}, S_c>,   dh0 = G_0

With ``outputs="fused"`` the outputs and their cotangents are kernels too (:func:`fused_chunk_outputs`,
:mod:`pallas_kernels.gpu.gdn_chunk_outputs`).

XLA differentiates the rest. Under a mesh (``jax.set_mesh``) the kernels, opaque to XLA's partitioner, run inside
``jax.shard_map``: batch split over the mesh's data/fsdp/expert axes, heads over ``tensor`` (when they divide);
axes already manual are left alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m2rnn_jax.ops.gated_delta_rule.chunked import (
    HIGHEST,
    local_factors,
    matmul,
    run_chunked,
    triangular_inverse,
    unit_lower_inverse,
    xla_outputs,
)
from m2rnn_jax.parallel.axes import HEAD_MESH_AXIS, auto_axis_sizes, batch_split_axes, spec_entry
from pallas_kernels.gpu.gdn_chunk_factors import chunk_factors_backward, chunk_factors_forward
from pallas_kernels.gpu.gdn_chunk_outputs import chunk_outputs_backward, chunk_outputs_forward
from pallas_kernels.gpu.gdn_chunk_states import StatesKernelConfig, chunk_states_backward, chunk_states_forward
from pallas_kernels.gpu.gdn_walk_cotangents import walk_input_cotangents
from pallas_kernels.gpu.unit_lower_inverse import unit_lower_inverse_backward, unit_lower_inverse_forward

# measured on an H200 at B=8, S=4096, H=2, K=256, V=512, bf16, 64-token chunks (experiments/RESULTS.md, session 5,
# run 2)
DEFAULT_FORWARD_CONFIG = StatesKernelConfig(block_v=64, num_warps=4, num_stages=2)
DEFAULT_BACKWARD_CONFIG = StatesKernelConfig(block_v=64, num_warps=8, num_stages=2)
# Longer chunks: two pipeline stages of the (C, K) factor tiles outgrow an H100/H200's 227 KiB of shared memory
# (C=128, K=256 bf16: 311-319 KB, Triton 3.6 for sm_90); one stage needs 98 KB.
LONG_CHUNK_FORWARD_CONFIG = StatesKernelConfig(block_v=64, num_warps=4, num_stages=1)
LONG_CHUNK_BACKWARD_CONFIG = StatesKernelConfig(block_v=64, num_warps=8, num_stages=1)
INVERSES = ("kernel", "doubling", "triangular_solve")
STAGE_CHOICES = ("xla", "fused")
# The stages with a fused form, in resolution order (local_backward is the backward of local="fused").
STAGES = ("local", "local_backward", "outputs", "walk_cotangents")
# The stages fused when their argument is None and the inputs are 16-bit (float32 inputs take "xla": their products
# compile to FMA loops). All four: on an H100 (session 24) each one alone made the op faster and all four took its
# forward+backward from 3.117 to 2.367 ms and the 400M 1L hybrid's step from 257.0 to 243.9 ms (experiments/RESULTS.md).
FUSED_BY_DEFAULT: frozenset[str] = frozenset(STAGES)
FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def default_states_configs(chunk_size: int) -> tuple[StatesKernelConfig, StatesKernelConfig]:
    """(forward, backward) launch configurations of the walk kernels for chunks of ``chunk_size`` tokens."""
    if chunk_size <= 64:
        return DEFAULT_FORWARD_CONFIG, DEFAULT_BACKWARD_CONFIG
    return LONG_CHUNK_FORWARD_CONFIG, LONG_CHUNK_BACKWARD_CONFIG


def _power_of_two_at_least_16(n: int) -> bool:
    return n >= 16 and not n & (n - 1)


def fused_unsupported_reason(k_dim: int, v_dim: int, chunk_size: int, dtype: jnp.dtype) -> str | None:
    """Why the fused backend cannot take these sizes (None if it can): K, V and the chunk length must be powers of
    two >= 16 (Triton's block rule) and the inputs bf16, f16 or f32."""
    for name, n in (("K (q.shape[-1])", k_dim), ("V (v.shape[-1])", v_dim), ("chunk_size", chunk_size)):
        if not _power_of_two_at_least_16(n):
            return f"{name}: expected a power of two >= 16 for backend 'pallas_gpu', got {n}"
    if jnp.dtype(dtype) not in FUSED_DTYPES:
        return f"q.dtype: expected bfloat16, float16 or float32 for backend 'pallas_gpu', got {jnp.dtype(dtype)}"
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def fused_chunk_states(
    U,
    Wk,
    Kd,
    carry,
    h0,
    forward_config: StatesKernelConfig,
    backward_config: StatesKernelConfig,
    walk_cotangents: str,
    interpret: bool,
):
    """(W, chunk-start states, final state) of the walk over chunks; see :func:`chunk_states_forward`.
    ``walk_cotangents``: how the backward forms dWk, dKd and da from the reverse walk's results ("xla" einsums and
    a reduction, or the "fused" kernel of :mod:`pallas_kernels.gpu.gdn_walk_cotangents`)."""
    return chunk_states_forward(U, Wk, Kd, carry, h0, config=forward_config, interpret=interpret)


def _fused_forward(U, Wk, Kd, carry, h0, forward_config, backward_config, walk_cotangents, interpret):
    w, starts, final = chunk_states_forward(U, Wk, Kd, carry, h0, config=forward_config, interpret=interpret)
    return (w, starts, final), (Wk, Kd, carry, w, starts)


def _fused_backward(forward_config, backward_config, walk_cotangents, interpret, residuals, cotangents):
    Wk, Kd, carry, w, starts = residuals
    dw_ext, dstarts, dfinal = cotangents
    dw, g_next, dh0 = chunk_states_backward(
        Wk, Kd, carry, dw_ext, dstarts, dfinal, config=backward_config, interpret=interpret
    )
    dot = Wk.dtype
    if walk_cotangents == "fused":
        dWk, dKd, dcarry = walk_input_cotangents(dw, starts, w, g_next, interpret=interpret)
    else:
        dWk = -matmul("...cv,...kv->...ck", dw, starts, dot)
        dKd = matmul("...cv,...kv->...ck", w, g_next, dot)
        dcarry = jnp.sum(g_next.astype(jnp.float32) * starts.astype(jnp.float32), axis=(-2, -1))
    return dw.astype(w.dtype), dWk.astype(dot), dKd.astype(dot), dcarry.astype(carry.dtype), dh0


fused_chunk_states.defvjp(_fused_forward, _fused_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fused_unit_lower_inverse(A: jax.Array, precision: jax.lax.Precision, interpret: bool) -> jax.Array:
    """(I + A)⁻¹ of A (..., C, C) float32 strictly lower triangular by the kernels of
    :mod:`pallas_kernels.gpu.unit_lower_inverse`, forward and backward."""
    return unit_lower_inverse_forward(A, precision=precision, interpret=interpret)


def _inverse_forward(A, precision, interpret):
    T = unit_lower_inverse_forward(A, precision=precision, interpret=interpret)
    return T, T


def _inverse_backward(precision, interpret, T, dT):
    return (unit_lower_inverse_backward(T, dT.astype(T.dtype), precision=precision, interpret=interpret),)


fused_unit_lower_inverse.defvjp(_inverse_forward, _inverse_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def fused_local_factors(q, k, v, beta, decay, start, end, precision: jax.lax.Precision, backward: str, interpret: bool):
    """(U, Wk, Kd, Qd, QK) of :func:`~m2rnn_jax.ops.gated_delta_rule.chunked.local_factors` by the one kernel of
    :mod:`pallas_kernels.gpu.gdn_chunk_factors`. ``backward`` "fused": the backward kernel there; "xla": XLA's
    autodiff of ``local_factors`` with the kernel's T = (I + A)⁻¹ standing in for the inverse (its gradient by the
    inverse's backward kernel; the forward products it does not need, U, Wk and QK, are dead code there)."""
    return chunk_factors_forward(q, k, v, beta, decay, start, end, precision=precision, interpret=interpret)[:5]


def _local_forward(q, k, v, beta, decay, start, end, precision, backward, interpret):
    *factors, T = chunk_factors_forward(q, k, v, beta, decay, start, end, precision=precision, interpret=interpret)
    return tuple(factors), (q, k, v, beta, decay, start, end, T)


def _local_backward(precision, backward, interpret, residuals, cotangents):
    *inputs, T = residuals
    if backward == "fused":
        grads = chunk_factors_backward(*inputs, T, tuple(cotangents), precision=precision, interpret=interpret)
        return tuple(g.astype(x.dtype) for g, x in zip(grads, inputs))

    def given_inverse(A):
        return _saved_inverse(A, T, precision, interpret)

    _, pullback = jax.vjp(functools.partial(local_factors, inverse=given_inverse, dot_dtype=inputs[0].dtype), *inputs)
    return pullback(tuple(cotangents))


fused_local_factors.defvjp(_local_forward, _local_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _saved_inverse(A: jax.Array, T: jax.Array, precision: jax.lax.Precision, interpret: bool) -> jax.Array:
    """T, the inverse of I + A computed earlier, with the inverse's gradient with respect to A (none to T)."""
    del A
    return T


def _saved_inverse_forward(A, T, precision, interpret):
    return T, T


def _saved_inverse_backward(precision, interpret, T, dT):
    dA = unit_lower_inverse_backward(T, dT.astype(T.dtype), precision=precision, interpret=interpret)
    return dA, jnp.zeros_like(T)


_saved_inverse.defvjp(_saved_inverse_forward, _saved_inverse_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_chunk_outputs(Qd, QK, starts, w, out_dtype: jnp.dtype, interpret: bool):
    """O (B, n, C, H, V) token-major in ``out_dtype``: :func:`~m2rnn_jax.ops.gated_delta_rule.chunked.xla_outputs`
    by the kernels of :mod:`pallas_kernels.gpu.gdn_chunk_outputs`, forward and backward."""
    return chunk_outputs_forward(Qd, QK, starts, w, out_dtype=out_dtype, interpret=interpret)


def _outputs_forward(Qd, QK, starts, w, out_dtype, interpret):
    return fused_chunk_outputs(Qd, QK, starts, w, out_dtype, interpret), (Qd, QK, starts, w)


def _outputs_backward(out_dtype, interpret, residuals, do):
    return chunk_outputs_backward(*residuals, do, interpret=interpret)


fused_chunk_outputs.defvjp(_outputs_forward, _outputs_backward)


def mesh_split(batch: int, heads: int) -> P | None:
    """PartitionSpec (batch axes, head axis) for the (B, H, ...) arrays of the walk under the current mesh, or None
    when nothing is split (no mesh, axes of size 1 or already manual, sizes that do not divide)."""
    sizes = auto_axis_sizes()
    batch_axes = batch_split_axes(sizes, batch)
    head_shards = sizes.get(HEAD_MESH_AXIS, 1)
    head_axis = HEAD_MESH_AXIS if head_shards > 1 and heads % head_shards == 0 else None
    if not batch_axes and head_axis is None:
        return None
    return P(spec_entry(batch_axes), head_axis)


def per_shard(kernels, *arrays: jax.Array, token_major: int = 0, token_major_result: bool = False):
    """``kernels(*arrays)`` inside ``jax.shard_map`` over :func:`mesh_split`'s axes when the current mesh splits
    them, else as is. The arrays and the results are (B, H, ...), except the first ``token_major`` arrays, and the
    one result if ``token_major_result``, which are (B, n, C, H, ...) (split into chunks in the (B, S, H, ...)
    layout); all are split alike."""
    heads_first = arrays[token_major:]
    spec = mesh_split(heads_first[0].shape[0], heads_first[0].shape[1])
    if spec is None:
        return kernels(*arrays)
    token_spec = P(spec[0], None, None, spec[1])
    in_specs = (token_spec,) * token_major + (spec,) * len(heads_first)
    out_specs = token_spec if token_major_result else spec
    return jax.shard_map(kernels, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)


def resolve_stages(dtype: jnp.dtype, interpret: bool, **chosen: str | None) -> dict[str, str]:
    """Each of :data:`STAGES` as "xla" or "fused" from the arguments of :func:`gated_delta_rule_pallas_gpu`
    (``chosen``: name -> "xla", "fused" or None): the value given, or for None "fused" when the stage is in
    :data:`FUSED_BY_DEFAULT`, the inputs are 16-bit and (for local_backward) local is "fused", else "xla".

    Raises ValueError naming the argument for other values, local_backward="fused" without local="fused", and a
    "fused" stage with float32 inputs outside interpret mode.
    """
    sixteen_bit = jnp.dtype(dtype) != jnp.float32
    stages: dict[str, str] = {}
    for name in STAGES:
        value = chosen[name]
        if value is None:
            fused = (
                name in FUSED_BY_DEFAULT and sixteen_bit and (name != "local_backward" or stages["local"] == "fused")
            )
            value = "fused" if fused else "xla"
        elif value not in STAGE_CHOICES:
            raise ValueError(f"{name}: expected one of {list(STAGE_CHOICES)}, got {value!r}")
        stages[name] = value
    if stages["local_backward"] == "fused" and stages["local"] != "fused":
        raise ValueError(
            f"local_backward: 'fused' is the backward of local='fused'; expected 'xla', got local={stages['local']!r}"
        )
    for name in ("local", "outputs", "walk_cotangents"):
        if stages[name] == "fused" and not interpret and not sixteen_bit:
            raise ValueError(
                f"{name}: 'fused' takes bfloat16 or float16 inputs on the GPU (float32 products compile to FMA "
                "loops: over 14 minutes for the local factors at K=256 offline); expected 'xla' for float32 inputs"
            )
    return stages


def gated_delta_rule_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_alpha: jax.Array,
    h0: jax.Array,
    reset: jax.Array | None,
    *,
    chunk_size: int,
    interpret: bool = False,
    forward_config: StatesKernelConfig | None = None,
    backward_config: StatesKernelConfig | None = None,
    inverse: str = "kernel",
    local: str | None = None,
    outputs: str | None = None,
    walk_cotangents: str | None = None,
    local_backward: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Validated inputs (op contract; h0 given) -> (o (B, S, H, V) in q's dtype, final state (B, H, K, V) float32).

    Products take q's dtype; ``local`` picks how the chunk-local factors are formed: as batched "xla" matmuls
    around the chunk inverse, or "fused" in one kernel per chunk (:func:`fused_local_factors`, its inverse inside;
    16-bit inputs, float32 only in interpret mode); ``outputs`` how the outputs O_c = Qd_c S_c + QK_c W_c are
    formed: as "xla" matmuls (float32 results, summed and rounded) or "fused" in one kernel (forward) and two
    (backward) that write O and read its cotangent token-major (:func:`fused_chunk_outputs`; the same dtypes);
    ``walk_cotangents`` how the walk's backward forms dWk = -dW Sᵀ, dKd = W Gᵀ and da = <G, S>: "xla" einsums and
    a reduction, or "fused" in one kernel (:func:`fused_chunk_states`); ``local_backward`` the backward of the
    "fused" local stage: XLA's autodiff ("xla") or its own kernel ("fused", dQ, dK, dV written token-major);
    None for any of these four: :func:`resolve_stages` (:data:`FUSED_BY_DEFAULT`);
    ``inverse`` picks the "xla" factors' chunk inverse: the block doubling in one "kernel" launch or as XLA's
    "doubling" matmuls (both at the matmul unit's default precision for 16-bit inputs and full float32 for float32
    inputs), or XLA's "triangular_solve";
    ``forward_config`` / ``backward_config`` the launches of the fused walks (None: :func:`default_states_configs`).
    """
    reason = fused_unsupported_reason(q.shape[-1], v.shape[-1], chunk_size, q.dtype)
    if reason is not None:
        raise ValueError(reason)
    if inverse not in INVERSES:
        raise ValueError(f"inverse: expected one of {list(INVERSES)}, got {inverse!r}")
    stages = resolve_stages(
        q.dtype, interpret, local=local, local_backward=local_backward, outputs=outputs, walk_cotangents=walk_cotangents
    )
    local, local_backward, outputs, walk_cotangents = (stages[name] for name in STAGES)
    if local == "fused" and inverse != "kernel":
        raise ValueError(
            f"inverse: the fused local factors invert inside their kernel; expected 'kernel', got {inverse!r}"
        )
    default_forward, default_backward = default_states_configs(chunk_size)
    forward_config = default_forward if forward_config is None else forward_config
    backward_config = default_backward if backward_config is None else backward_config
    dot = q.dtype

    precision = HIGHEST if dot == jnp.float32 else jax.lax.Precision.DEFAULT

    def invert(A):
        if inverse == "triangular_solve":
            return triangular_inverse(A)
        if inverse == "doubling":
            return unit_lower_inverse(A, precision)
        return per_shard(lambda a: fused_unit_lower_inverse(a, precision, interpret), A)

    def local_stage(*inputs):
        if local == "fused":
            kernels = lambda *a: fused_local_factors(*a, precision, local_backward, interpret)  # noqa: E731
            return per_shard(kernels, *inputs, token_major=3)
        return local_factors(*inputs, inverse=invert, dot_dtype=dot)

    def states(U, Wk, Kd, carry, state):
        return per_shard(
            lambda *a: fused_chunk_states(*a, forward_config, backward_config, walk_cotangents, interpret),
            U,
            Wk,
            Kd,
            carry,
            state,
        )

    def output_stage(Qd, QK, starts, w, out_dtype):
        if outputs == "fused":
            kernels = lambda *a: fused_chunk_outputs(*a, out_dtype, interpret)  # noqa: E731
            return per_shard(kernels, Qd, QK, starts, w, token_major_result=True)
        return xla_outputs(Qd, QK, starts, w, out_dtype, dot_dtype=dot)

    beta, log_alpha, h0 = (x.astype(jnp.float32) for x in (beta, log_alpha, h0))
    return run_chunked(
        q,
        k,
        v,
        beta,
        log_alpha,
        h0,
        reset,
        chunk_size=chunk_size,
        local=local_stage,
        states=states,
        outputs=output_stage,
    )
