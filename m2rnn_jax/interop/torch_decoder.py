"""Independent PyTorch twin of the hybrid decoder (SPEC §9), built from an lm-engine ``config.json`` dict.

Parameter names and layouts are lm-engine's (``transformer.wte.weight``, ``transformer.h.{i}.ln_1.weight``,
``transformer.h.{i}.sequence_mixer.*``, ``transformer.h.{i}.ln_2.weight``, ``transformer.h.{i}.mlp_block.*``,
``transformer.ln_f.weight``, ``lm_head.weight``). Written from the SPEC equations: pre-norm blocks
``x += mixer(ln_1(x)); x += mlp(ln_2(x))``; SwiGLU on interleaved [gate, up] columns; MoE with lm-engine's
reference routing (SPEC §0.6: top-k router logits, softmax over the k, a loop over experts, an always-on shared
expert, aux loss = coef * (switch loss + 0.1 z-loss)). All math in the parameters' dtype (float32 / float64).
"""

from __future__ import annotations

from m2rnn_jax.interop.torch_mixers import (
    AttentionTorch,
    GatedDeltaNetTorch,
    Mamba2Torch,
    VectorRNNTorch,
    rms_norm,
    torch,
)
from m2rnn_jax.interop.torch_reference import M2RNNTorch

F = torch.nn.functional

__all__ = ["DecoderTorch", "SwiGLUTorch", "MoETorch", "build_sequence_mixer"]

_NORM_EPS = 1e-5  # lm-engine's eps of the M2RNN / RNN / GRU output norms (GDN and Mamba2 use layer_norm_epsilon)


class _Norm(torch.nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """(..., 2I) interleaved [gate, up] columns -> up * SiLU(gate) (..., I)."""
    return h[..., 1::2] * F.silu(h[..., 0::2])


class SwiGLUTorch(torch.nn.Module):
    """Dense SwiGLU: c_fc (h -> 2I interleaved), c_proj (I -> h)."""

    def __init__(self, hidden_size: int, intermediate_size: int, add_bias: bool, dtype: torch.dtype):
        super().__init__()
        self.c_fc = torch.nn.Linear(hidden_size, 2 * intermediate_size, bias=add_bias, dtype=dtype)
        self.c_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=add_bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_proj(swiglu(self.c_fc(x))), x.new_zeros(())


class MoETorch(torch.nn.Module):
    """Mixture of SwiGLU experts: gate.weight (E, h); c_fc.weight (E, 2I, h); c_proj.weight (E, h, I); optional
    c_fc_shared.weight (2I_s, h), c_proj_shared.weight (h, I_s); biases (E, out) / (out,) with add_bias.

    Returns (y, aux) with aux = coef * (E * sum_e mean_prob_e * frac_e + 0.1 * mean(logsumexp(logits)^2)), frac_e =
    share of the T*k selections that went to expert e.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        shared_intermediate_size: int | None,
        add_bias: bool,
        aux_coef: float,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.top_k, self.aux_coef, self.num_experts = top_k, aux_coef, num_experts
        E, I, h = num_experts, intermediate_size, hidden_size
        self.gate = torch.nn.Linear(h, E, bias=False, dtype=dtype)
        self.c_fc, self.c_proj = torch.nn.Module(), torch.nn.Module()
        self.c_fc.weight = torch.nn.Parameter(torch.zeros(E, 2 * I, h, dtype=dtype))
        self.c_proj.weight = torch.nn.Parameter(torch.zeros(E, h, I, dtype=dtype))
        self.c_fc.bias = torch.nn.Parameter(torch.zeros(E, 2 * I, dtype=dtype)) if add_bias else None
        self.c_proj.bias = torch.nn.Parameter(torch.zeros(E, h, dtype=dtype)) if add_bias else None
        self.shared = shared_intermediate_size is not None
        if self.shared:
            self.c_fc_shared = torch.nn.Linear(h, 2 * shared_intermediate_size, bias=add_bias, dtype=dtype)
            self.c_proj_shared = torch.nn.Linear(shared_intermediate_size, h, bias=add_bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.gate(tokens)  # (T, E)
        top_logits, selected = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)  # (T, k)
        out = torch.zeros_like(tokens)
        for expert in range(self.num_experts):
            rows, slots = (selected == expert).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            bias_fc = None if self.c_fc.bias is None else self.c_fc.bias[expert]
            bias_proj = None if self.c_proj.bias is None else self.c_proj.bias[expert]
            hidden = swiglu(F.linear(tokens[rows], self.c_fc.weight[expert], bias_fc))
            y = F.linear(hidden, self.c_proj.weight[expert], bias_proj)
            out = out.index_add(0, rows, y * weights[rows, slots, None])
        if self.shared:
            out = out + self.c_proj_shared(swiglu(self.c_fc_shared(tokens)))
        mean_probability = torch.softmax(logits, dim=-1).mean(0)
        counts = torch.bincount(selected.flatten(), minlength=self.num_experts).to(logits.dtype)
        switch = self.num_experts * (mean_probability * counts / counts.sum()).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return out.reshape(x.shape), self.aux_coef * (switch + 0.1 * z_loss)


def build_sequence_mixer(block: dict, hidden_size: int, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The twin of one lm-engine ``sequence_mixer_blocks`` entry (validated by ``from_lm_engine_config``)."""
    kind = block["sequence_mixer_type"]
    if kind == "m2rnn":
        counts = {f"num_{x}_heads": block[f"num_{x}_heads"] for x in ("q", "k", "v", "f", "g", "weight")}
        return M2RNNTorch(
            hidden_size,
            num_heads=max(v for k, v in counts.items() if k != "num_g_heads"),
            **counts,
            k_head_dim=block["k_head_dim"],
            v_head_dim=block["v_head_dim"],
            kernel_size=block["kernel_size"],
            activation_function=block["activation_function"],
            use_residual=block["use_residual"],
            add_bias=block["add_bias"],
            gradient_clipping=block["gradient_clipping"],
            norm_eps=_NORM_EPS,
            dtype=dtype,
        )
    if kind == "gated_deltanet":
        return GatedDeltaNetTorch(
            hidden_size,
            num_heads=block["num_v_heads"],
            num_k_heads=block["num_k_heads"],
            k_head_dim=block["k_head_dim"],
            v_head_dim=block["v_head_dim"],
            kernel_size=block["kernel_size"],
            use_gate=block["use_gate"],
            allow_neg_eigval=block["allow_neg_eigval"],
            attention_multiplier=block["attention_multiplier"],
            norm_eps=config["layer_norm_epsilon"],
            dtype=dtype,
        )
    if kind == "mamba2":
        return Mamba2Torch(
            hidden_size,
            num_heads=block["num_heads"],
            intermediate_size=block["intermediate_size"],
            state_size=block["state_size"],
            num_groups=block["num_groups"],
            kernel_size=block["conv_kernel_size"],
            add_bias=block.get("add_bias", False),
            use_conv_bias=block.get("use_conv_bias", True),
            norm_eps=config["layer_norm_epsilon"],
            dtype=dtype,
        )
    if kind == "softmax_attention":
        head_dim = block.get("head_dim") or hidden_size // block["num_attention_heads"]
        rope = config["position_embedding_type"] == "rope"
        return AttentionTorch(
            hidden_size,
            num_heads=block["num_attention_heads"],
            num_kv_heads=block["num_key_value_heads"],
            head_dim=head_dim,
            add_bias=block.get("add_bias", False),
            rope_theta=float(config["rope_theta"]) if rope else None,
            dtype=dtype,
        )
    if kind in ("rnn", "gru"):
        return VectorRNNTorch(
            hidden_size,
            gru=kind == "gru",
            num_heads=block["num_input_heads"],
            head_dim=block["state_head_dim"],
            kernel_size=block["kernel_size"],
            activation_function=block["activation_function"],
            add_bias=block["add_bias"],
            gradient_clipping=block["gradient_clipping"],
            norm_eps=_NORM_EPS,
            dtype=dtype,
        )
    raise ValueError(
        f"sequence_mixer_type: expected one of m2rnn, gated_deltanet, mamba2, softmax_attention, rnn, gru, got {kind!r}"
    )


class _Block(torch.nn.Module):
    def __init__(self, mixer_block: dict, mlp_block: dict, config: dict, dtype: torch.dtype):
        super().__init__()
        h, eps = config["hidden_size"], config["layer_norm_epsilon"]
        self.ln_1 = _Norm(h, eps, dtype)
        self.sequence_mixer = build_sequence_mixer(mixer_block, h, config, dtype)
        self.ln_2 = _Norm(h, eps, dtype)
        if mlp_block.get("mlp_type", "MLP") == "MoE":
            self.mlp_block = MoETorch(
                h,
                num_experts=mlp_block["num_experts"],
                top_k=mlp_block["num_experts_per_tok"],
                intermediate_size=mlp_block["intermediate_size"],
                shared_intermediate_size=mlp_block["shared_intermediate_size"],
                add_bias=mlp_block.get("add_bias", False),
                aux_coef=config.get("router_aux_loss_coef") or 0.0,
                dtype=dtype,
            )
        else:
            self.mlp_block = SwiGLUTorch(h, mlp_block["intermediate_size"], mlp_block.get("add_bias", False), dtype)

    def forward(self, x: torch.Tensor, state: tuple | None):
        mixed, new_state = self.sequence_mixer(self.ln_1(x), *(state or ()))
        x = x + mixed
        channel, aux = self.mlp_block(self.ln_2(x))
        return x + channel, new_state, aux


class DecoderTorch(torch.nn.Module):
    """The decoder twin: ``forward(input_ids (B, S), cache) -> (logits (B, S, vocab), new cache, aux loss ())``.

    ``cache`` is None or the tuple of per-layer mixer states a previous call returned; running a sequence in
    pieces while passing the cache equals running it at once. Parameters start as zeros / ones: load weights with
    ``load_state_dict`` (strict).
    """

    def __init__(self, config: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        h, vocab = config["hidden_size"], config["vocab_size"]
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(vocab, h, dtype=dtype)
        self.transformer.h = torch.nn.ModuleList(
            _Block(mixer, mlp, config, dtype)
            for mixer, mlp in zip(config["sequence_mixer_blocks"], config["mlp_blocks"])
        )
        self.transformer.ln_f = _Norm(h, config["layer_norm_epsilon"], dtype)
        self.tied = bool(config["tie_word_embeddings"])
        if not self.tied:
            self.lm_head = torch.nn.Linear(h, vocab, bias=False, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, cache: tuple | None = None):
        x = self.transformer.wte(input_ids)
        cache = cache or (None,) * len(self.transformer.h)
        new_cache, aux = [], x.new_zeros(())
        for block, state in zip(self.transformer.h, cache):
            x, new_state, block_aux = block(x, state)
            new_cache.append(new_state)
            aux = aux + block_aux
        x = self.transformer.ln_f(x)
        head = self.transformer.wte.weight if self.tied else self.lm_head.weight
        return F.linear(x, head), tuple(new_cache), aux


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, S, vocab) against target ids (B, S)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
