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
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={num_tokens}; got {bounds}")


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


_CONV_ACTIVATIONS = {"silu": F.silu}


class M2RNNTorch(torch.nn.Module):
    """The lm-engine M2RNN sequence mixer (SPEC §3) in PyTorch, with lm-engine parameter names.

    x (B, S, h) -> input_projection -> [q | k | v | f | g]; f = exp(-exp(A_log) * softplus(f + dt_bias));
    [q | k | v] -> causal depthwise conv (left padding / carried state, SiLU); (y, H) = m2rnn_torch(...);
    y += D * v; y *= SiLU(g) per head block; RMSNorm over N*V; output_projection -> (B, S, h).

    Parameters (lm-engine names and layouts): input_projection.weight (C + Nf + Ng*V, h) [.bias],
    conv1d.weight (C, 1, ks) [.bias], decay_gate.A_log (N,), decay_gate.dt_bias (N,), D (N, V) if use_residual,
    state_weight (Nw, V, V), g_norm.weight (N*V,), output_projection.weight (h, N*V); C = (Nq + Nk)*K + Nv*V.
    Gate parameters are kept in ``promote_types(float32, dtype)``. ``kernel_size=None`` means no conv.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int,
        k_head_dim: int,
        v_head_dim: int,
        num_q_heads: int,
        num_k_heads: int,
        num_v_heads: int,
        num_f_heads: int,
        num_g_heads: int,
        num_weight_heads: int,
        kernel_size: int | None = 4,
        activation_function: str | None = "silu",
        use_residual: bool = True,
        add_bias: bool = False,
        gradient_clipping: float | None = 1.0,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        num_layers: int = 1,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        counts = {"Nq": num_q_heads, "Nk": num_k_heads, "Nv": num_v_heads, "Nf": num_f_heads, "Nw": num_weight_heads}
        if _num_heads(counts) != num_heads or num_f_heads != num_heads or num_heads % num_g_heads:
            raise ValueError(
                f"num_heads must equal max(head counts) = num_f_heads and be divisible by num_g_heads; "
                f"got num_heads={num_heads}, {counts}, Ng={num_g_heads}"
            )
        if use_residual and num_v_heads != num_heads:
            raise ValueError(f"use_residual needs num_v_heads == num_heads={num_heads}; got {num_v_heads}")
        if (kernel_size is None and activation_function is not None) or (
            activation_function is not None and activation_function not in _CONV_ACTIVATIONS
        ):
            raise ValueError(
                f"activation_function must be None (required without a conv) or one of {sorted(_CONV_ACTIVATIONS)}"
                f"; got {activation_function!r} with kernel_size={kernel_size}"
            )
        self.num_heads, self.k_head_dim, self.v_head_dim = num_heads, k_head_dim, v_head_dim
        self.head_counts = dict(q=num_q_heads, k=num_k_heads, v=num_v_heads, f=num_f_heads, g=num_g_heads)
        self.kernel_size, self.activation_function = kernel_size, activation_function
        self.gradient_clipping, self.norm_eps = gradient_clipping, norm_eps
        self.conv_channels = (num_q_heads + num_k_heads) * k_head_dim + num_v_heads * v_head_dim
        gate_dtype = torch.promote_types(torch.float32, dtype)
        projection_size = self.conv_channels + num_f_heads + num_g_heads * v_head_dim
        self.input_projection = torch.nn.Linear(hidden_size, projection_size, bias=add_bias, dtype=dtype)
        self.conv1d = (
            None
            if kernel_size is None
            else torch.nn.Conv1d(
                self.conv_channels,
                self.conv_channels,
                kernel_size,
                groups=self.conv_channels,
                bias=add_bias,
                dtype=dtype,
            )
        )
        self.decay_gate = torch.nn.Module()
        self.decay_gate.A_log = torch.nn.Parameter(torch.empty(num_heads, dtype=gate_dtype))
        self.decay_gate.dt_bias = torch.nn.Parameter(torch.empty(num_heads, dtype=gate_dtype))
        self.D = torch.nn.Parameter(torch.empty(num_heads, v_head_dim, dtype=dtype)) if use_residual else None
        self.state_weight = torch.nn.Parameter(torch.empty(num_weight_heads, v_head_dim, v_head_dim, dtype=dtype))
        self.g_norm = torch.nn.Module()
        self.g_norm.weight = torch.nn.Parameter(torch.empty(num_heads * v_head_dim, dtype=dtype))
        self.output_projection = torch.nn.Linear(num_heads * v_head_dim, hidden_size, bias=False, dtype=dtype)
        self.reset_parameters(initializer_range, num_layers)

    @torch.no_grad()
    def reset_parameters(self, initializer_range: float = 0.02, num_layers: int = 1) -> None:
        """SPEC §3.3 init: N(0, sigma) projections and conv (output depth-scaled), gate per §2.3, D = 1, W = I."""
        self.input_projection.weight.normal_(0.0, initializer_range)
        self.output_projection.weight.normal_(0.0, initializer_range / math.sqrt(2 * num_layers))
        biases = [self.input_projection.bias]
        if self.conv1d is not None:
            self.conv1d.weight.normal_(0.0, initializer_range)
            biases.append(self.conv1d.bias)
        for bias in biases:
            if bias is not None:
                bias.zero_()
        self.decay_gate.A_log.copy_(torch.empty_like(self.decay_gate.A_log).uniform_(0.0, 16.0).log())
        log_dt = torch.empty_like(self.decay_gate.dt_bias).uniform_(math.log(1e-3), math.log(0.1))
        dt = log_dt.exp().clamp(min=1e-4)
        self.decay_gate.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        if self.D is not None:
            self.D.fill_(1.0)
        self.state_weight.copy_(torch.eye(self.v_head_dim, dtype=self.state_weight.dtype).expand_as(self.state_weight))
        self.g_norm.weight.fill_(1.0)

    def _forget(self, f_raw: torch.Tensor) -> torch.Tensor:
        """(B, S, N) raw gate inputs -> f = exp(-exp(A_log) softplus(f_raw + dt_bias)) in f_raw.dtype."""
        gate_dtype = torch.promote_types(torch.float32, f_raw.dtype)
        dt = F.softplus(f_raw.to(gate_dtype) + self.decay_gate.dt_bias.to(gate_dtype))
        return torch.exp(-torch.exp(self.decay_gate.A_log.to(gate_dtype)) * dt).to(f_raw.dtype)

    def _conv(self, qkv: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C), state (B, C, ks - 1) of raw inputs or None (= zero left padding) -> conv + act, new state."""
        channels_first = qkv.transpose(1, 2)  # (B, C, S)
        if conv_state is None:
            conv_state = channels_first.new_zeros(qkv.shape[0], self.conv_channels, self.kernel_size - 1)
        padded = torch.cat([conv_state.to(qkv.dtype), channels_first], dim=-1)
        out = F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=self.conv_channels)
        if self.activation_function is not None:
            act_dtype = torch.promote_types(torch.float32, out.dtype)
            out = _CONV_ACTIVATIONS[self.activation_function](out.to(act_dtype)).to(qkv.dtype)
        return out.transpose(1, 2), padded[..., qkv.shape[1] :]

    def _rms_norm(self, y: torch.Tensor) -> torch.Tensor:
        norm_dtype = torch.promote_types(torch.float32, y.dtype)
        y32 = y.to(norm_dtype)
        y32 = y32 * torch.rsqrt(y32.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
        return (y32 * self.g_norm.weight.to(norm_dtype)).to(y.dtype)

    def forward(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        recurrent_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor]]:
        """x (B, S, h), conv_state (B, C, ks - 1) raw inputs, recurrent_state (B, N, K, V) ->
        (y (B, S, h), (new conv_state or None without a conv, new recurrent_state))."""
        batch, seq_len, _ = x.shape
        N, K, V, heads = self.num_heads, self.k_head_dim, self.v_head_dim, self.head_counts
        qkv, f_raw, g = self.input_projection(x).split([self.conv_channels, heads["f"], heads["g"] * V], dim=-1)
        f = self._forget(f_raw)
        if self.conv1d is not None:
            qkv, conv_state = self._conv(qkv, conv_state)
        q, k, v = qkv.split([heads["q"] * K, heads["k"] * K, heads["v"] * V], dim=-1)
        q = q.reshape(batch, seq_len, heads["q"], K)
        k = k.reshape(batch, seq_len, heads["k"], K)
        v = v.reshape(batch, seq_len, heads["v"], V)
        y, recurrent_state = m2rnn_torch(
            q, k, v, self.state_weight, f, recurrent_state, gradient_clipping=self.gradient_clipping
        )
        if self.D is not None:
            y = y + v * self.D
        gate_dtype = torch.promote_types(torch.float32, g.dtype)
        gate = F.silu(g.to(gate_dtype)).to(g.dtype).reshape(batch, seq_len, heads["g"], V)
        y = y * _expand_heads(gate, N, dim=2)  # per head block (SPEC §0.3)
        y = self._rms_norm(y.reshape(batch, seq_len, N * V))
        return self.output_projection(y), (conv_state, recurrent_state)
