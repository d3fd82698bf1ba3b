"""Argument checks of the M2RNN op: every error names the argument, the expected and the actual value."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class M2RNNShapes:
    """Sizes of one validated call.

    ``batch`` is B (number of sequences); ``tokens`` is S for dense inputs and T (packed tokens) for varlen.
    ``num_heads`` is N = max(Nq, Nk, Nv, Nf, Nw).
    """

    batch: int
    tokens: int
    num_heads: int
    k_dim: int
    v_dim: int
    num_q_heads: int
    num_k_heads: int
    num_v_heads: int
    num_f_heads: int
    num_w_heads: int
    varlen: bool


def _shape_str(shape: tuple[int, ...]) -> str:
    return str(tuple(int(d) for d in shape))


def _require_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}")


def _require_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name}: expected rank {rank} with shape {layout}, got shape {_shape_str(x.shape)}")


def _require_dim(name: str, x: jax.Array, axis: int, expected: int, layout: str, what: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(f"{name}: expected shape {layout} with {what} = {expected}, got shape {_shape_str(x.shape)}")


def _check_cu_seqlens(cu_seqlens: jax.Array, tokens: int) -> int:
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape (B+1,) with B >= 1, got shape {_shape_str(cu_seqlens.shape)}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens: expected an integer array, got dtype {cu_seqlens.dtype}")
    try:
        values = np.asarray(cu_seqlens)
    except jax.errors.TracerArrayConversionError:  # traced under jit: values are checked only when concrete
        return cu_seqlens.shape[0] - 1
    if values[0] != 0 or values[-1] != tokens or np.any(np.diff(values) < 0):
        raise ValueError(
            "cu_seqlens: expected non-decreasing offsets starting at 0 and ending at the number of packed "
            f"tokens T = {tokens}, got {values.tolist()}"
        )
    return cu_seqlens.shape[0] - 1


def _check_reset(reset: jax.Array, batch: int, tokens: int, varlen: bool) -> None:
    if varlen:
        raise ValueError("reset: expected None with cu_seqlens (varlen sequences already start from h0), got an array")
    if reset.dtype != jnp.bool_:
        raise ValueError(f"reset: expected a bool array, got dtype {reset.dtype}")
    if tuple(reset.shape) != (batch, tokens):
        raise ValueError(f"reset: expected shape (B, S) = {_shape_str((batch, tokens))}, got {_shape_str(reset.shape)}")


def validate_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    cu_seqlens: jax.Array | None,
    reset: jax.Array | None = None,
) -> M2RNNShapes:
    """Check ranks, sizes, head counts and dtypes of the op's inputs; return the sizes of the call."""
    varlen = cu_seqlens is not None
    lead = "T" if varlen else "B, S"
    lead_rank = 1 if varlen else 2
    layouts = {
        "q": f"({lead}, Nq, K)",
        "k": f"({lead}, Nk, K)",
        "v": f"({lead}, Nv, V)",
        "f": f"({lead}, Nf)",
    }
    for name, x, rank in (("q", q, 2), ("k", k, 2), ("v", v, 2), ("f", f, 1)):
        _require_float(name, x)
        _require_rank(name, x, lead_rank + rank, layouts[name])
    _require_float("W", W)
    _require_rank("W", W, 3, "(Nw, V, V)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")

    lead_shape = q.shape[:lead_rank]
    for name, x in (("k", k), ("v", v), ("f", f)):
        if x.shape[:lead_rank] != lead_shape:
            raise ValueError(
                f"{name}: expected leading dims ({lead}) = {_shape_str(lead_shape)} as in q, "
                f"got shape {_shape_str(x.shape)}"
            )
    k_dim, v_dim = q.shape[-1], v.shape[-1]
    _require_dim("k", k, -1, k_dim, layouts["k"], "K (as in q)")
    _require_dim("W", W, 1, v_dim, "(Nw, V, V)", "V (as in v)")
    _require_dim("W", W, 2, v_dim, "(Nw, V, V)", "V (as in v)")

    counts = {
        "q": q.shape[-2],
        "k": k.shape[-2],
        "v": v.shape[-2],
        "f": f.shape[-1],
        "W": W.shape[0],
    }
    num_heads = max(counts.values())
    bad = {name: c for name, c in counts.items() if c == 0 or num_heads % c}
    if bad:
        listing = ", ".join(f"{name}: {c}" for name, c in counts.items())
        raise ValueError(
            f"head counts: each of Nq, Nk, Nv, Nf, Nw must divide N = max(...) = {num_heads}; got {listing} "
            f"({', '.join(bad)} do not divide {num_heads})"
        )

    if varlen:
        batch = _check_cu_seqlens(cu_seqlens, q.shape[0])
        tokens = q.shape[0]
    else:
        batch, tokens = q.shape[0], q.shape[1]
    if h0 is not None:
        _require_float("h0", h0)
        expected = (batch, num_heads, k_dim, v_dim)
        if tuple(h0.shape) != expected:
            raise ValueError(f"h0: expected shape (B, N, K, V) = {_shape_str(expected)}, got {_shape_str(h0.shape)}")
    if reset is not None:
        _check_reset(reset, batch, tokens, varlen)
    return M2RNNShapes(
        batch=batch,
        tokens=tokens,
        num_heads=num_heads,
        k_dim=k_dim,
        v_dim=v_dim,
        num_q_heads=counts["q"],
        num_k_heads=counts["k"],
        num_v_heads=counts["v"],
        num_f_heads=counts["f"],
        num_w_heads=counts["W"],
        varlen=varlen,
    )


def resolve_shapes(
    shapes: M2RNNShapes | None,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    cu_seqlens: jax.Array | None,
) -> M2RNNShapes:
    """``shapes`` as the op validated them, or, for a direct call of a backend (``shapes`` None), the inputs
    validated here: the one place a backend learns B, S/T, N, K, V and the head counts."""
    return validate_inputs(q, k, v, W, f, h0, cu_seqlens) if shapes is None else shapes


def state_dtypes(state_dtype: jnp.dtype, input_dtype: jnp.dtype) -> tuple[jnp.dtype, jnp.dtype]:
    """Return (storage dtype of the carried state, dtype of the per-step arithmetic).

    The state is stored in ``promote_types(state_dtype, input_dtype)`` (float32 for bf16/f32 inputs by default,
    float64 for float64 inputs, bfloat16 only when both are bfloat16); the arithmetic uses at least float32.
    """
    state_dtype = jnp.dtype(state_dtype)
    if not jnp.issubdtype(state_dtype, jnp.floating):
        raise ValueError(f"state_dtype: expected a floating-point dtype, got {state_dtype}")
    storage = jnp.promote_types(state_dtype, input_dtype)
    return storage, jnp.promote_types(storage, jnp.float32)
