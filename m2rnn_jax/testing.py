"""Random, realistic inputs for the ops (M2RNN, the gated delta rule), error measures and a VJP harness (values
and every gradient of an op), shared by tests and benchmarks.

Realistic means what the trained layer feeds the op: forget values from the softplus decay gate at init
(f = exp(-A * softplus(x + dt_bias)), A ~ U(0, 16), dt_bias from dt ~ logU(1e-3, 0.1); f roughly in [0.2, 1]),
a state weight near the identity, and q, k, v of unit scale (post conv + SiLU). Never zeros.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The differentiable arguments of the M2RNN op, in its argument order.
M2RNN_DIFFERENTIABLE: tuple[str, ...] = ("q", "k", "v", "W", "f", "h0")


def _numpy_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (typed or raw uint32): drawing with NumPy compiles nothing."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())


def decay_gate_forget_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Forget values f of ``shape`` (..., Nf) in (0, 1] from the softplus decay gate with SPEC §2.3 init (float32)."""
    num_heads = shape[-1]
    a = rng.uniform(0.0, 16.0, num_heads)
    dt = np.maximum(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), num_heads)), 1e-4)
    dt_bias = dt + np.log(-np.expm1(-dt))
    x = 0.5 * rng.standard_normal(shape)
    return np.exp(-a * np.logaddexp(0.0, x + dt_bias)).astype(np.float32)


def random_m2rnn_inputs(
    key: jax.Array,
    *,
    batch: int,
    seq_len: int,
    num_heads: int,
    k_dim: int,
    v_dim: int,
    num_q_heads: int | None = None,
    num_k_heads: int | None = None,
    num_v_heads: int | None = None,
    num_f_heads: int | None = None,
    num_w_heads: int | None = None,
    dtype: jnp.dtype = jnp.float32,
    with_h0: bool = True,
    cu_seqlens: list[int] | np.ndarray | None = None,
) -> dict[str, jax.Array]:
    """Return a dict with q, k, v, W, f, h0 (and cu_seqlens) for one op call, drawn deterministically from ``key``.

    Dense: q (batch, seq_len, Nq, K) etc. Varlen (``cu_seqlens`` given): packed (T, ...) inputs with
    T = cu_seqlens[-1] and ``batch`` ignored in favour of len(cu_seqlens) - 1. Head counts default to
    ``num_heads``. q, k, v, f, W and h0 have ``dtype``; h0 entries lie in [-1, 1] like a reachable state.
    """
    counts = {
        "q": num_q_heads or num_heads,
        "k": num_k_heads or num_heads,
        "v": num_v_heads or num_heads,
        "f": num_f_heads or num_heads,
        "w": num_w_heads or num_heads,
    }
    if cu_seqlens is not None:
        offsets = np.asarray(cu_seqlens, dtype=np.int32)
        batch, lead = len(offsets) - 1, (int(offsets[-1]),)
    else:
        lead = (batch, seq_len)
    rng = _numpy_rng(key)
    inputs = {
        "q": rng.standard_normal(lead + (counts["q"], k_dim)),
        "k": rng.standard_normal(lead + (counts["k"], k_dim)),
        "v": rng.standard_normal(lead + (counts["v"], v_dim)),
        "f": decay_gate_forget_values(rng, lead + (counts["f"],)),
        "W": np.eye(v_dim) + 0.3 / np.sqrt(v_dim) * rng.standard_normal((counts["w"], v_dim, v_dim)),
    }
    if with_h0:
        inputs["h0"] = np.tanh(rng.standard_normal((batch, num_heads, k_dim, v_dim)))
    # round through float32 first so that every dtype sees the same draws
    inputs = {name: jnp.asarray(x.astype(np.float32)).astype(dtype) for name, x in inputs.items()}
    if cu_seqlens is not None:
        inputs["cu_seqlens"] = jnp.asarray(offsets)
    return inputs


def random_gdn_inputs(
    seed: int,
    batch: int,
    seq_len: int,
    heads: int,
    k_dim: int,
    v_dim: int,
    dtype: jnp.dtype = jnp.float32,
    reset_rate: float = 0.0,
) -> dict[str, jax.Array]:
    """Layer-like inputs: q, k (B, S, H, K) L2-normalised (q scaled by K^-1/2), v (B, S, H, V) in ``dtype``;
    beta in (0, 2) and log_alpha in [-1.6, -1e-3] (B, S, H) float32; h0 (B, H, K, V) float32; reset (B, S) bool
    with about ``reset_rate`` of the positions True (None when the rate is 0)."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    inputs = {
        "q": jnp.asarray(unit((batch, seq_len, heads, k_dim)) * k_dim**-0.5, dtype),
        "k": jnp.asarray(unit((batch, seq_len, heads, k_dim)), dtype),
        "v": jnp.asarray(rng.standard_normal((batch, seq_len, heads, v_dim)), dtype),
        "beta": jnp.asarray(2.0 / (1.0 + np.exp(-rng.standard_normal((batch, seq_len, heads)))), jnp.float32),
        "log_alpha": jnp.asarray(-np.exp(rng.uniform(np.log(1e-3), np.log(1.6), (batch, seq_len, heads))), jnp.float32),
        "h0": jnp.asarray(rng.standard_normal((batch, heads, k_dim, v_dim)) * 0.1, jnp.float32),
    }
    inputs["reset"] = jnp.asarray(rng.uniform(size=(batch, seq_len)) < reset_rate) if reset_rate > 0 else None
    return inputs


def relative_error(actual: jax.Array, expected: jax.Array) -> float:
    """||actual - expected||_2 / ||expected||_2 over all elements, in float64 on the host."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def max_relative_error(actual: jax.Array, expected: jax.Array, floor: float = 1e-30) -> float:
    """max |actual - expected| / max(max |expected|, ``floor``), in float64 on the host.

    ``floor`` 1.0 makes it an absolute error for references of magnitude below one.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), floor))


class OpVJP(NamedTuple):
    """What :func:`op_values_and_grads` returns: ``fn``'s outputs, the gradient of each differentiated input (by
    name) and the cotangents used (given or drawn)."""

    outputs: Any
    grads: dict[str, jax.Array]
    cotangents: Any


def random_cotangents(key: jax.Array, outputs: Any) -> Any:
    """Standard-normal cotangents shaped like ``outputs`` (a pytree of arrays or ``jax.ShapeDtypeStruct``): leaf i
    drawn in float32 from ``jax.random.split(key, n)[i]``, then cast to the leaf's dtype."""
    leaves, treedef = jax.tree.flatten(outputs)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, leaf.shape, jnp.float32).astype(leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def op_values_and_grads(
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    cotangents: Any = None,
    *,
    key: jax.Array | None = None,
    wrt: Sequence[str] = M2RNN_DIFFERENTIABLE,
) -> OpVJP:
    """``fn(**inputs)`` and the gradients of <outputs, cotangents> w.r.t. every input named in ``wrt`` that is
    present and not None, through one jitted ``jax.vjp``.

    The other entries of ``inputs`` (``cu_seqlens``, an ``h0`` of None) are passed to ``fn`` unchanged, as
    constants. Give ``cotangents`` (a pytree like ``fn``'s outputs) or ``key`` (drawn by :func:`random_cotangents`
    from the outputs' shapes and dtypes), not both.
    """
    if (cotangents is None) == (key is None):
        given = "neither" if cotangents is None else "both"
        raise ValueError(f"cotangents, key: expected exactly one of them, got {given}")
    names = [name for name in wrt if inputs.get(name) is not None]
    constants = {name: x for name, x in inputs.items() if name not in names}
    primals = [inputs[name] for name in names]

    def call(*arrays: jax.Array) -> Any:
        return fn(**constants, **dict(zip(names, arrays)))

    if cotangents is None:
        cotangents = random_cotangents(key, jax.eval_shape(call, *primals))

    @jax.jit
    def values_and_pullback(primals: list[jax.Array], cotangents: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        outputs, pullback = jax.vjp(call, *primals)
        return outputs, pullback(cotangents)

    outputs, grads = values_and_pullback(primals, cotangents)
    return OpVJP(outputs, dict(zip(names, grads)), cotangents)


def jaxpr_equations(jaxpr: Any, primitive: str) -> list:
    """Every equation of ``primitive`` (a name, e.g. "dot_general") in ``jaxpr`` (a ``Jaxpr``) and the jaxprs nested
    in its equations' parameters (jit, custom VJPs, control flow)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    found.extend(jaxpr_equations(inner, primitive))
    return found


@contextlib.contextmanager
def cuda_lowering_without_a_gpu() -> Iterator[None]:
    """Inside: Pallas-Triton kernels lower for CUDA (``lower(lowering_platforms=("cuda",))``) on a host without a
    GPU. jax >= 0.11 asks the default device for its compute capability while lowering; this hands it an H200's
    (sm_90). Older jax does not ask, and nothing is changed."""
    registration = importlib.import_module("jax._src.pallas.triton.pallas_call_registration")
    gpu_info = getattr(registration, "gpu_info_lib", None)
    if gpu_info is None:
        yield
        return
    original = gpu_info.get_gpu_info
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    try:
        yield
    finally:
        gpu_info.get_gpu_info = original
