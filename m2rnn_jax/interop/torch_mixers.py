"""Independent PyTorch twins of the baseline sequence mixers (SPEC §9.2, §9.4), with lm-engine parameter names.

Written from the SPEC equations, not from the JAX layers: every recurrence is a literal Python loop over time
steps (no chunked or parallel forms), attention is an explicit masked softmax. Each module takes and returns its
decoding state as a tuple of tensors (``None`` = start from zeros / an empty cache):

* :class:`GatedDeltaNetTorch` (lm-engine ``GatedDeltaNet``): (conv (B, C, ks - 1), recurrent (B, Nv, dk, dv));
* :class:`Mamba2Torch` (``Mamba2``): (conv (B, C, ks - 1), recurrent (B, H, P, N));
* :class:`AttentionTorch` (``Attention`` with a ``LinearCache``): (key (B, T, Nkv, d), value (B, T, Nkv, d));
* :class:`VectorRNNTorch` (``RNN`` / ``GRU``): (conv (B, N d, ks - 1) or None, recurrent (B, N, d)).

Conv states hold the last ``ks - 1`` raw (pre-conv) inputs, channels first as lm-engine keeps them. All math runs
in the parameters' dtype (the twins are for float32 / float64 parity checks).
"""

from __future__ import annotations

import math

from m2rnn_jax.interop.torch_reference import _ClampCotangent, torch

F = torch.nn.functional

__all__ = [
    "causal_conv",
    "rms_norm",
    "rope",
    "GatedDeltaNetTorch",
    "Mamba2Torch",
    "AttentionTorch",
    "VectorRNNTorch",
]

ACTIVATIONS = {"silu": F.silu, None: lambda x: x}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x**2, -1) + eps) * weight over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv: x (B, S, C), weight (C, 1, ks), state (B, C, ks - 1) raw inputs or None (zeros).

    out[t, c] = act(sum_j weight[c, 0, j] * x[t - (ks - 1) + j, c] + bias[c]); returns (out (B, S, C), the last
    ks - 1 raw inputs (B, C, ks - 1)).
    """
    channels, kernel_size = weight.shape[0], weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], channels, kernel_size - 1)
    window = torch.cat([state, x.transpose(1, 2)], dim=-1)  # (B, C, ks - 1 + S)
    steps = [(window[:, :, t : t + kernel_size] * weight[:, 0]).sum(-1) for t in range(x.shape[1])]
    out = torch.stack(steps, dim=1) if steps else x.clone()
    if bias is not None:
        out = out + bias
    return ACTIVATIONS[activation](out), window[:, :, x.shape[1] :]


class _DecayGate(torch.nn.Module):
    """The softplus decay gate's parameters (SPEC §2.3): ``A_log`` and ``dt_bias``, one per head."""

    def __init__(self, num_heads: int, dtype: torch.dtype):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.zeros(num_heads, dtype=dtype))
        self.dt_bias = torch.nn.Parameter(torch.zeros(num_heads, dtype=dtype))

    def time_step(self, x: torch.Tensor) -> torch.Tensor:
        """dt = softplus(x + dt_bias), x (..., heads)."""
        return F.softplus(x + self.dt_bias)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """-exp(A_log) * dt (..., heads)."""
        return -torch.exp(self.A_log) * self.time_step(x)


def _linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> torch.nn.Linear:
    return torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def _conv_module(channels: int, kernel_size: int, bias: bool, dtype: torch.dtype) -> torch.nn.Conv1d:
    """Holds lm-engine's ``conv1d.weight`` (C, 1, ks) and ``conv1d.bias`` (C,); applied by :func:`causal_conv`."""
    return torch.nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias, dtype=dtype)


class GatedDeltaNetTorch(torch.nn.Module):
    """Gated DeltaNet (SPEC §9.4) as a step loop: x (B, S, h), state -> (y (B, S, h), new state).

    qkv_proj -> conv(SiLU, no bias) on [q (Nk dk) | k (Nk dk) | v (Nv dv)]; ab_proj -> [a (Nv) | b (Nv) | gate];
    q, k repeated to Nv heads in contiguous blocks and L2-normalised (eps 1e-6 inside the root), q scaled by
    1/sqrt(dk) or ``attention_multiplier``; beta = sigmoid(b) (x2 with ``allow_neg_eigval``); alpha =
    exp(-exp(A_log) softplus(a + dt_bias)); S_t = alpha_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T,
    o_t = S_t^T q_t; o *= SiLU(gate); per-head RMSNorm over dv (o_norm); o_proj.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int,
        num_k_heads: int,
        k_head_dim: int,
        v_head_dim: int,
        kernel_size: int,
        use_gate: bool,
        allow_neg_eigval: bool,
        attention_multiplier: float | None,
        norm_eps: float,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.Nv, self.Nk, self.dk, self.dv = num_heads, num_k_heads, k_head_dim, v_head_dim
        self.use_gate, self.allow_neg_eigval, self.norm_eps = use_gate, allow_neg_eigval, norm_eps
        self.scale = attention_multiplier if attention_multiplier is not None else k_head_dim**-0.5
        channels = 2 * num_k_heads * k_head_dim + num_heads * v_head_dim
        self.qkv_proj = _linear(hidden_size, channels, False, dtype)
        self.ab_proj = _linear(hidden_size, 2 * num_heads + (num_heads * v_head_dim if use_gate else 0), False, dtype)
        self.qkv_conv1d = _conv_module(channels, kernel_size, False, dtype)
        self.decay_gate = _DecayGate(num_heads, dtype)
        self.o_norm = torch.nn.Module()
        self.o_norm.weight = torch.nn.Parameter(torch.ones(v_head_dim, dtype=dtype))
        self.o_proj = _linear(num_heads * v_head_dim, hidden_size, False, dtype)

    def forward(self, x: torch.Tensor, conv_state=None, recurrent_state=None):
        B, S, _ = x.shape
        Nv, Nk, dk, dv = self.Nv, self.Nk, self.dk, self.dv
        ab = self.ab_proj(x)
        a, b = ab[..., :Nv], ab[..., Nv : 2 * Nv]
        qkv, conv_state = causal_conv(self.qkv_proj(x), self.qkv_conv1d.weight, None, conv_state, "silu")
        q, k, v = qkv.split([Nk * dk, Nk * dk, Nv * dv], dim=-1)
        q = q.reshape(B, S, Nk, dk).repeat_interleave(Nv // Nk, dim=2)
        k = k.reshape(B, S, Nk, dk).repeat_interleave(Nv // Nk, dim=2)
        v = v.reshape(B, S, Nv, dv)
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6) * self.scale
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
        beta = torch.sigmoid(b) * (2.0 if self.allow_neg_eigval else 1.0)
        alpha = torch.exp(self.decay_gate.log_decay(a))
        state = x.new_zeros(B, Nv, dk, dv) if recurrent_state is None else recurrent_state
        outputs = []
        for t in range(S):
            k_t, v_t = k[:, t], v[:, t]  # (B, Nv, dk), (B, Nv, dv)
            k_state = torch.einsum("bnk,bnkv->bnv", k_t, state)
            erased = state - beta[:, t, :, None, None] * k_t[..., None] * k_state[:, :, None, :]
            state = alpha[:, t, :, None, None] * erased + beta[:, t, :, None, None] * k_t[..., None] * v_t[:, :, None]
            outputs.append(torch.einsum("bnk,bnkv->bnv", q[:, t], state))
        o = torch.stack(outputs, dim=1)  # (B, S, Nv, dv)
        if self.use_gate:
            o = o * F.silu(ab[..., 2 * Nv :].reshape(B, S, Nv, dv))
        o = rms_norm(o, self.o_norm.weight, self.norm_eps)
        return self.o_proj(o.reshape(B, S, Nv * dv)), (conv_state, state)


class Mamba2Torch(torch.nn.Module):
    """Mamba2 (SPEC §9.4) as a step loop: x (B, S, h), state -> (y (B, S, h), new state).

    in_proj -> [z (I) | xBC (I + 2GN) | dt_raw (H)]; conv(SiLU, bias) on xBC -> [x | B | C]; dt = softplus(dt_raw +
    dt_bias), A = -exp(A_log); head h (dim P = I / H) reads group h // (H / G):
    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T, y_t = s_t C_t + D x_t; y *= SiLU(z); RMSNorm over I (norm); out_proj.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int,
        intermediate_size: int,
        state_size: int,
        num_groups: int,
        kernel_size: int,
        add_bias: bool,
        use_conv_bias: bool,
        norm_eps: float,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.H, self.I, self.N, self.G, self.norm_eps = num_heads, intermediate_size, state_size, num_groups, norm_eps
        self.P = intermediate_size // num_heads
        self.channels = intermediate_size + 2 * num_groups * state_size
        self.in_proj = _linear(hidden_size, intermediate_size + self.channels + num_heads, add_bias, dtype)
        self.conv1d = _conv_module(self.channels, kernel_size, use_conv_bias, dtype)
        self.decay_gate = _DecayGate(num_heads, dtype)
        self.D = torch.nn.Parameter(torch.ones(num_heads, dtype=dtype))
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.ones(intermediate_size, dtype=dtype))
        self.out_proj = _linear(intermediate_size, hidden_size, add_bias, dtype)

    def forward(self, x: torch.Tensor, conv_state=None, recurrent_state=None):
        Bsz, S, _ = x.shape
        H, I, N, G, P = self.H, self.I, self.N, self.G, self.P
        z, xBC, dt_raw = self.in_proj(x).split([I, self.channels, H], dim=-1)
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias, conv_state, "silu")
        xs, Bm, Cm = xBC.split([I, G * N, G * N], dim=-1)
        xs = xs.reshape(Bsz, S, H, P)
        group = torch.arange(H) // (H // G)  # source group of every head
        Bm, Cm = Bm.reshape(Bsz, S, G, N)[:, :, group], Cm.reshape(Bsz, S, G, N)[:, :, group]  # (B, S, H, N)
        dt = self.decay_gate.time_step(dt_raw)  # (B, S, H)
        decay = torch.exp(dt * -torch.exp(self.decay_gate.A_log))
        state = x.new_zeros(Bsz, H, P, N) if recurrent_state is None else recurrent_state
        outputs = []
        for t in range(S):
            write = (dt[:, t, :, None] * xs[:, t])[..., None] * Bm[:, t, :, None, :]  # (B, H, P, N)
            state = decay[:, t, :, None, None] * state + write
            outputs.append(torch.einsum("bhpn,bhn->bhp", state, Cm[:, t]) + self.D[:, None] * xs[:, t])
        y = torch.stack(outputs, dim=1).reshape(Bsz, S, I) * F.silu(z)
        return self.out_proj(rms_norm(y, self.norm.weight, self.norm_eps)), (conv_state, state)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the full head dim: x (B, S, n, d), positions (S,); pair i = (x[i], x[i + d/2])."""
    d = x.shape[-1]
    inverse_frequencies = theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    angles = positions.to(x.dtype)[:, None] * inverse_frequencies  # (S, d/2)
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AttentionTorch(torch.nn.Module):
    """Causal softmax attention (SPEC §9.2): x (B, S, h), (key, value) cache -> (y (B, S, h), new cache).

    c_attn output viewed per KV head as [q-group (G d) | k (d) | v (d)], G = Nq / Nkv; query head n reads KV head
    n // G; optional RoPE (θ ``rope_theta``) at absolute positions continuing the cache; scale 1/sqrt(d); explicit
    causal mask over [cache | new]; c_proj. The cache is lm-engine's ``LinearCache``: keys/values concatenated.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        add_bias: bool,
        rope_theta: float | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.Nq, self.Nkv, self.d, self.rope_theta = num_heads, num_kv_heads, head_dim, rope_theta
        self.c_attn = _linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, add_bias, dtype)
        self.c_proj = _linear(num_heads * head_dim, hidden_size, add_bias, dtype)

    def forward(self, x: torch.Tensor, past_key=None, past_value=None):
        B, S, _ = x.shape
        Nq, Nkv, d = self.Nq, self.Nkv, self.d
        group = Nq // Nkv
        qkv = self.c_attn(x).reshape(B, S, Nkv, group + 2, d)
        q = qkv[:, :, :, :group].reshape(B, S, Nq, d)
        k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
        past = 0 if past_key is None else past_key.shape[1]
        positions = torch.arange(past, past + S)
        if self.rope_theta is not None:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if past_key is not None:
            k, v = torch.cat([past_key, k], dim=1), torch.cat([past_value, v], dim=1)
        keys = k.repeat_interleave(group, dim=2)  # (B, T, Nq, d)
        values = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bsnd,btnd->bnst", q, keys) / math.sqrt(d)
        visible = torch.arange(k.shape[1])[None, :] <= positions[:, None]  # (S, T)
        probabilities = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out = torch.einsum("bnst,btnd->bsnd", probabilities, values).reshape(B, S, Nq * d)
        return self.c_proj(out), (k, v)


class VectorRNNTorch(torch.nn.Module):
    """RNN and GRU baselines (SPEC §9.4) as step loops: x (B, S, h), state -> (y (B, S, h), new state).

    input_projection -> [x | (GRU: x_f | x_r) | g], each N d wide; conv (act, bias = add_bias) on x only, or just
    the activation without a conv; state_weight (N or 3N, d, d) = [W (| W_f | W_r)];
    RNN: h_t = tanh(h_{t-1} W + x_t); GRU: f = σ(h W_f + x_f), r = σ(h W_r + x_r), z = tanh((h ⊙ r) W + x),
    h_t = f h_{t-1} + (1 - f) z. The state handed to the next step has its cotangent clamped to
    [-gradient_clipping, gradient_clipping]. Output: y ⊙ SiLU(g) -> RMSNorm over N d (norm) -> output_projection.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        gru: bool,
        num_heads: int,
        head_dim: int,
        kernel_size: int | None,
        activation_function: str | None,
        add_bias: bool,
        gradient_clipping: float | None,
        norm_eps: float,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.gru, self.N, self.d, self.norm_eps = gru, num_heads, head_dim, norm_eps
        self.activation_function = activation_function
        self.clip = None if gradient_clipping is None else abs(float(gradient_clipping))
        width = num_heads * head_dim
        blocks = 4 if gru else 2
        self.input_projection = _linear(hidden_size, blocks * width, add_bias, dtype)
        self.conv1d = None if kernel_size is None else _conv_module(width, kernel_size, add_bias, dtype)
        self.state_weight = torch.nn.Parameter(torch.zeros((blocks - 1) * num_heads, head_dim, head_dim, dtype=dtype))
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.ones(width, dtype=dtype))
        self.output_projection = _linear(width, hidden_size, False, dtype)

    def forward(self, x: torch.Tensor, conv_state=None, recurrent_state=None):
        B, S, _ = x.shape
        N, d = self.N, self.d
        projected = self.input_projection(x).chunk(4 if self.gru else 2, dim=-1)
        first, g = projected[0], projected[-1]
        if self.conv1d is None:
            first = ACTIVATIONS[self.activation_function](first)
        else:
            first, conv_state = causal_conv(
                first, self.conv1d.weight, self.conv1d.bias, conv_state, self.activation_function
            )
        inputs = [t.reshape(B, S, N, d) for t in (first, *projected[1:-1])]
        weights = self.state_weight.split(N, dim=0)
        h = x.new_zeros(B, N, d) if recurrent_state is None else recurrent_state
        outputs = []
        for t in range(S):
            if self.gru:
                forget = torch.sigmoid(torch.einsum("bnd,nde->bne", h, weights[1]) + inputs[1][:, t])
                reset = torch.sigmoid(torch.einsum("bnd,nde->bne", h, weights[2]) + inputs[2][:, t])
                candidate = torch.tanh(torch.einsum("bnd,nde->bne", h * reset, weights[0]) + inputs[0][:, t])
                h = forget * h + (1 - forget) * candidate
            else:
                h = torch.tanh(torch.einsum("bnd,nde->bne", h, weights[0]) + inputs[0][:, t])
            outputs.append(h)
            if self.clip is not None:
                h = _ClampCotangent.apply(h, self.clip)
        y = torch.stack(outputs, dim=1).reshape(B, S, N * d) * F.silu(g)
        return self.output_projection(rms_norm(y, self.norm.weight, self.norm_eps)), (conv_state, h)
