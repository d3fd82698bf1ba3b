"""Independent PyTorch reference of the M2RNN op and layer, written from SPEC §0, §2 and §3.

It exists to check the JAX implementation against a second, literal implementation (and against
the lm-engine parameter layout), so it favours obviousness over speed: the recurrence is a Python loop
over time steps and varlen inputs are a Python loop over sequences.

PyTorch is an optional dependency (``pip install m2rnn-jax[torch]``).
"""

from __future__ import annotations

import math

try:
    import torch
    import torch.nn.functional as F
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "m2rnn_jax.interop needs PyTorch, which is an optional dependency: pip install m2rnn-jax[torch]"
    ) from err

__all__ = ["m2rnn_torch", "M2RNNTorch"]


class _ClampCotangent(torch.autograd.Function):
    """Identity whose backward clamps the incoming cotangent to [-bound, bound] (SPEC §2.8)."""

    @staticmethod
    def forward(ctx, state: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.bound = bound
        return state.clone()

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor) -> tuple[torch.Tensor, None]:
        return cotangent.clamp(-ctx.bound, ctx.bound), None


def _num_heads(counts: dict[str, int]) -> int:
    """N = max of the head counts; every count must divide N (SPEC §0.3)."""
    num_heads = max(counts.values())
    bad = {name: count for name, count in counts.items() if count < 1 or num_heads % count}
    if bad:
        raise ValueError(f"every head count must divide N={num_heads}; got {counts}, offending: {bad}")
    return num_heads


def _expand_heads(x: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    """Repeat each source head N // N_x times in contiguous blocks (repeat_interleave semantics)."""
    return x.repeat_interleave(num_heads // x.shape[dim], dim=dim)


def _check_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}; got shape {tuple(x.shape)}")


def _check_inputs(q, k, v, W, f, h0, cu_seqlens) -> int:
    """Validate shapes (dense or varlen layout) and return N."""
    varlen = cu_seqlens is not None
    lead = "(T" if varlen else "(B, S"
    _check_rank("q", q, 3 if varlen else 4, f"{lead}, Nq, K)")
    _check_rank("k", k, 3 if varlen else 4, f"{lead}, Nk, K)")
    _check_rank("v", v, 3 if varlen else 4, f"{lead}, Nv, V)")
    _check_rank("f", f, 2 if varlen else 3, f"{lead}, Nf)")
    _check_rank("W", W, 3, "(Nw, V, V)")
    lead_shape = tuple(q.shape[:-2])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[:-2]) != lead_shape:
            raise ValueError(f"{name} leading dims must equal q's {lead_shape}; got {tuple(x.shape[:-2])}")
    if tuple(f.shape[:-1]) != lead_shape:
        raise ValueError(f"f leading dims must equal q's {lead_shape}; got {tuple(f.shape[:-1])}")
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    if k.shape[-1] != key_dim:
        raise ValueError(f"k head dim must equal q's K={key_dim}; got {k.shape[-1]}")
    if tuple(W.shape[1:]) != (value_dim, value_dim):
        raise ValueError(f"W must have shape (Nw, {value_dim}, {value_dim}); got {tuple(W.shape)}")
    num_heads = _num_heads(
        {"Nq": q.shape[-2], "Nk": k.shape[-2], "Nv": v.shape[-2], "Nf": f.shape[-1], "Nw": W.shape[0]}
    )
    if varlen:
        _check_cu_seqlens(cu_seqlens, q.shape[0])
        batch = cu_seqlens.shape[0] - 1
    else:
        batch = q.shape[0]
    if h0 is not None and tuple(h0.shape) != (batch, num_heads, key_dim, value_dim):
        raise ValueError(
            f"h0 must have shape (B, N, K, V) = {(batch, num_heads, key_dim, value_dim)}; got {tuple(h0.shape)}"
        )
    return num_heads


def _check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (B+1,) with B >= 1; got {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at T={num_tokens}; got {bounds}"
        )


def _recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    f: torch.Tensor,
    h: torch.Tensor,
    gradient_clipping: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step loop of SPEC §2.1 on heads already expanded to N.

    q, k (B, S, N, K); v (B, S, N, V); W (N, V, V); f (B, S, N); h (B, N, K, V), all in the state dtype.
    Returns y (B, S, N, V) and the final state (B, N, K, V).
    """
    outputs = []
    for t in range(q.shape[1]):
        write = k[:, t, :, :, None] * v[:, t, :, None, :]  # k_t v_t^T, (B, N, K, V)
        z = torch.tanh(torch.matmul(h, W) + write)  # H_{t-1} W per head
        forget = f[:, t, :, None, None]
        h = forget * h + (1 - forget) * z
        outputs.append(torch.einsum("bnk,bnkv->bnv", q[:, t], h))  # y_t = H_t^T q_t, unclamped H_t
        if gradient_clipping is not None:
            # The state carried to step t+1 (or returned) has its cotangent clamped (SPEC §0.1, §2.7).
            h = _ClampCotangent.apply(h, gradient_clipping)
    if not outputs:
        return v.new_zeros(q.shape[0], 0, *v.shape[2:]), h
    return torch.stack(outputs, dim=1), h


def m2rnn_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    f: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    gradient_clipping: float | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M2RNN recurrence, literal PyTorch loop (same contract as ``m2rnn_jax.m2rnn``).

    Dense: q (B, S, Nq, K), k (B, S, Nk, K), v (B, S, Nv, V), f (B, S, Nf), W (Nw, V, V),
    h0 (B, N, K, V) or None -> y (B, S, N, V), h_final (B, N, K, V).
    Varlen: q (T, Nq, K), k (T, Nk, K), v (T, Nv, V), f (T, Nf), cu_seqlens (B+1,) ->
    y (T, N, V), h_final (B, N, K, V), each sequence starting from its own h0[b].

    The state is carried in ``torch.promote_types(state_dtype, q.dtype)``; y comes back in q.dtype and
    h_final in h0.dtype (q.dtype when h0 is None). ``gradient_clipping=c`` clamps, in the backward, the
    cotangent of the state carried to the next step and of h_final to [-|c|, |c|]; dh0 is not clamped.
    """
    num_heads = _check_inputs(q, k, v, W, f, h0, cu_seqlens)
    clip = None if gradient_clipping is None else abs(float(gradient_clipping))
    compute_dtype = torch.promote_types(state_dtype, q.dtype)
    out_state_dtype = q.dtype if h0 is None else h0.dtype

    def expand(x: torch.Tensor, dim: int) -> torch.Tensor:
        return _expand_heads(x.to(compute_dtype), num_heads, dim)

    if cu_seqlens is None:
        q_, k_, v_, f_ = (expand(x, 2) for x in (q, k, v, f))
        batch, key_dim, value_dim = q.shape[0], q.shape[-1], v.shape[-1]
    else:  # a leading batch axis of one per sequence, added below
        q_, k_, v_, f_ = (expand(x, 1) for x in (q, k, v, f))
        batch, key_dim, value_dim = cu_seqlens.shape[0] - 1, q.shape[-1], v.shape[-1]
    W_ = expand(W, 0)
    if h0 is None:
        h0_ = torch.zeros(batch, num_heads, key_dim, value_dim, dtype=compute_dtype, device=q.device)
    else:
        h0_ = h0.to(compute_dtype)

    if cu_seqlens is None:
        y, h_final = _recurrence(q_, k_, v_, W_, f_, h0_, clip)
    else:
        bounds = cu_seqlens.tolist()
        ys, finals = [], []
        for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            y_b, h_b = _recurrence(
                *(x[None, start:end] for x in (q_, k_, v_)), W_, f_[None, start:end], h0_[b : b + 1], clip
            )
            ys.append(y_b[0])
            finals.append(h_b)
        y, h_final = torch.cat(ys, dim=0), torch.cat(finals, dim=0)
    return y.to(q.dtype), h_final.to(out_state_dtype)
