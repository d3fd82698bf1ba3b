"""Model-config translation between :class:`~m2rnn_jax.models.ModelConfig` and lm-engine's ``config.json``.

lm-engine (``CommonConfig`` of ``gpt_base``) lists one ``sequence_mixer_blocks`` entry and one ``mlp_blocks`` entry
per layer; our config has one config per mixer letter and one channel mixer for all layers. Translation is exact
both ways for what both sides can express, and a ``ValueError`` naming the field otherwise:

* lm-engine -> ours: every field must be known; fields that change the computation must have values we implement
  (e.g. ``normalization_function: rmsnorm``, ``position_embedding_type`` nope/rope, no dropout, no muP multipliers,
  ``normalized_topk: true``); all blocks of one mixer type must share one config, all MLP blocks must be equal.
  Fields that do not change the computation (token ids, ``max_position_embeddings``, init settings, HF metadata)
  are accepted and dropped.
* ours -> lm-engine: JAX-only execution fields (``backend``, ``implementation``, GDN ``chunk_size``, dtypes,
  ``remat``) are dropped; fields without an lm-engine counterpart must keep their default (e.g. a mixer
  ``norm_eps`` other than lm-engine's: 1e-5 for M2RNN / RNN / GRU, ``layer_norm_epsilon`` for GDN and Mamba2).
"""

from __future__ import annotations

import math
from typing import Any

from m2rnn_jax.layers.attention import AttentionConfig
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNetConfig
from m2rnn_jax.layers.gru import GRUConfig
from m2rnn_jax.layers.m2rnn import M2RNNConfig
from m2rnn_jax.layers.mamba2 import Mamba2Config
from m2rnn_jax.layers.mlp import MLPConfig, MoEConfig
from m2rnn_jax.layers.rnn import RNNConfig
from m2rnn_jax.models.config import MIXER_FIELDS, ModelConfig

__all__ = ["to_lm_engine_config", "from_lm_engine_config", "MIXER_TYPES"]

# Our layer-pattern letter <-> lm-engine ``sequence_mixer_type``.
MIXER_TYPES: dict[str, str] = {
    "M": "m2rnn",
    "G": "gated_deltanet",
    "S": "mamba2",
    "A": "softmax_attention",
    "R": "rnn",
    "U": "gru",
}
_LETTERS = {mixer_type: letter for letter, mixer_type in MIXER_TYPES.items()}
_DEFAULT_EPS = 1e-5
_GATE_FIELDS = ("A_init_min", "A_init_max", "dt_init_min", "dt_init_max", "dt_init_floor")
# Model fields that do not change what the model computes from its weights (dropped when reading).
_IGNORED_MODEL_FIELDS = {
    "model_type",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "init_method",
    "embedding_init_method",
    "use_depth_scaled_init",
    "architectures",
    "name_or_path",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "auto_map",
    "_commit_hash",
    "_from_auto",
}


def _require(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)} (no counterpart in m2rnn-jax), got {value!r}")


def _require_default_eps(name: str, eps: float) -> None:
    if eps != _DEFAULT_EPS:
        raise ValueError(f"{name}: lm-engine fixes this norm's eps at {_DEFAULT_EPS}, got {eps!r}")


def _gate(config: Any) -> dict:
    return {name: getattr(config, name) for name in _GATE_FIELDS}


def _mixer_block(letter: str, config: Any, hidden_size: int, eps: float) -> dict:
    """One lm-engine ``sequence_mixer_blocks`` entry for our mixer config."""
    field = MIXER_FIELDS[letter]
    if letter == "M":
        _require_default_eps(f"{field}.norm_eps", config.norm_eps)
        if config.query != "token":
            raise ValueError(f"{field}.query: lm-engine reads q from the projection ('token'), got {config.query!r}")
        return dict(
            k_head_dim=config.k_head_dim,
            v_head_dim=config.v_head_dim,
            num_q_heads=config.num_q_heads,
            num_k_heads=config.num_k_heads,
            num_v_heads=config.num_v_heads,
            num_f_heads=config.num_f_heads,
            num_g_heads=config.num_g_heads,
            num_weight_heads=config.num_weight_heads,
            use_residual=config.use_residual,
            kernel_size=config.kernel_size,
            activation_function=config.activation_function,
            add_bias=config.add_bias,
            gradient_clipping=config.gradient_clipping,
            normalization_function="rmsnorm",
            **_gate(config),
        )
    if letter in ("G", "S") and config.norm_eps != eps:
        raise ValueError(
            f"{field}.norm_eps: lm-engine uses layer_norm_epsilon={eps!r} for this mixer's norm, "
            f"got {config.norm_eps!r}"
        )
    if letter == "G":
        return dict(
            k_head_dim=config.k_head_dim,
            v_head_dim=config.v_head_dim,
            num_k_heads=config.num_k_heads,
            num_v_heads=config.num_heads,
            use_gate=config.use_gate,
            attention_multiplier=config.attention_multiplier,
            allow_neg_eigval=config.allow_neg_eigval,
            kernel_size=config.kernel_size,
            **_gate(config),
        )
    if letter == "S":
        return dict(
            state_size=config.state_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_heads,
            conv_kernel_size=config.kernel_size,
            time_step_limit=[0.0, math.inf],
            add_bias=config.add_bias,
            use_conv_bias=config.use_conv_bias,
            activation_function="silu",
            num_groups=config.num_groups,
            chunk_size=config.chunk_size,
            normalization_function="rmsnorm",
            **_gate(config),
        )
    if letter == "A":
        return dict(
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim or hidden_size // config.num_heads,
            add_bias=config.add_bias,
            softmax_dropout=0.0,
            dropout=0.0,
            attention_multiplier=None,
            attention_multiplier_method="1 / sqrt(head_dim)",
            attention_gate=False,
            exclusive_self_attention=False,
            sliding_window=None,
        )
    _require_default_eps(f"{field}.norm_eps", config.norm_eps)
    heads = dict(num_input_heads=config.num_heads, num_weight_heads=config.num_heads)
    if letter == "U":
        heads.update(
            num_forget_input_heads=config.num_heads,
            num_reset_input_heads=config.num_heads,
            num_forget_weight_heads=config.num_heads,
            num_reset_weight_heads=config.num_heads,
        )
    return dict(
        state_head_dim=config.head_dim,
        **heads,
        add_bias=config.add_bias,
        normalization_function="rmsnorm",
        gradient_clipping=config.gradient_clipping,
        kernel_size=config.kernel_size,
        activation_function=config.activation_function,
    )


def _mlp_block(mlp: MLPConfig | MoEConfig) -> dict:
    block = dict(
        intermediate_size=mlp.intermediate_size, activation_function="swiglu", dropout=0.0, add_bias=mlp.add_bias
    )
    if isinstance(mlp, MLPConfig):
        return dict(mlp_type="MLP", **block)
    return dict(
        mlp_type="MoE",
        **block,
        shared_intermediate_size=mlp.shared_intermediate_size,
        num_experts=mlp.num_experts,
        num_experts_per_tok=mlp.top_k,
        shared_expert_gating=False,
        normalized_topk=True,
    )


def to_lm_engine_config(
    config: ModelConfig,
    *,
    bos_token_id: int = 0,
    eos_token_id: int = 0,
    pad_token_id: int = 0,
    max_position_embeddings: int = 4096,
) -> dict:
    """The lm-engine ``gpt_base`` config dict (``config.json``) of ``config``; token ids are metadata only."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config: expected ModelConfig, got {type(config).__name__}")
    attention = config.attention
    rope = attention is not None and attention.position_embedding == "rope"
    mixers = [
        dict(
            sequence_mixer_type=MIXER_TYPES[letter],
            **_mixer_block(letter, config.mixer_config(letter), config.hidden_size, config.norm_eps),
        )
        for letter in config.layer_pattern
    ]
    mlp = _mlp_block(config.mlp)
    return dict(
        model_type="gpt_base",
        vocab_size=config.vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        embedding_dropout=0.0,
        normalization_function="rmsnorm",
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.initializer_range,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        position_embedding_type="rope" if rope else "nope",
        rope_theta=attention.rope_theta if rope else 10000,
        rope_scaling=None,
        m_emb=None,
        m_width=None,
        m_residual=None,
        init_method="normal",
        embedding_init_method="normal",
        use_depth_scaled_init=True,
        sequence_mixer_blocks=mixers,
        mlp_blocks=[dict(mlp) for _ in range(config.num_layers)],
        tie_word_embeddings=config.tie_embeddings,
        router_aux_loss_coef=config.mlp.router_aux_loss_coef if isinstance(config.mlp, MoEConfig) else None,
        rope_dim=(attention.head_dim or config.hidden_size // attention.num_heads) if rope else None,
    )


class _Fields:
    """Reads one config dict, remembering which keys were used, so that unknown keys become errors."""

    def __init__(self, where: str, values: dict):
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        self.where, self.values, self.used = where, values, set()

    def get(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.values:
            if default is ...:
                raise ValueError(f"{self.where}.{key}: required field is missing")
            return default
        return self.values[key]

    def expect(self, key: str, allowed: tuple, default: Any = ...) -> Any:
        value = self.get(key, default)
        _require(f"{self.where}.{key}", value, allowed)
        return value

    def finish(self, ignored: set[str] = frozenset()) -> None:
        unknown = sorted(set(self.values) - self.used - set(ignored))
        if unknown:
            raise ValueError(f"{self.where}: fields without a counterpart in m2rnn-jax: {unknown}")


def _gate_from(fields: _Fields) -> dict:
    defaults = dict(A_init_min=0.0, A_init_max=16.0, dt_init_min=1e-3, dt_init_max=0.1, dt_init_floor=1e-4)
    return {name: fields.get(name, default) for name, default in defaults.items()}


def _mixer_from(fields: _Fields, eps: float, rope: bool, rope_theta: float, rope_dim: int | None) -> Any:
    kind = fields.get("sequence_mixer_type")
    if kind == "m2rnn":
        fields.expect("normalization_function", ("rmsnorm",))
        config = M2RNNConfig(
            num_heads=max(fields.get(f"num_{x}_heads") for x in ("q", "k", "v", "f", "weight")),
            k_head_dim=fields.get("k_head_dim"),
            v_head_dim=fields.get("v_head_dim"),
            num_q_heads=fields.get("num_q_heads"),
            num_k_heads=fields.get("num_k_heads"),
            num_v_heads=fields.get("num_v_heads"),
            num_f_heads=fields.get("num_f_heads"),
            num_g_heads=fields.get("num_g_heads"),
            num_weight_heads=fields.get("num_weight_heads"),
            kernel_size=fields.get("kernel_size"),
            activation_function=fields.get("activation_function"),
            use_residual=fields.get("use_residual"),
            add_bias=fields.get("add_bias"),
            gradient_clipping=fields.get("gradient_clipping"),
            **_gate_from(fields),
        )
    elif kind == "gated_deltanet":
        config = GatedDeltaNetConfig(
            num_heads=fields.get("num_v_heads"),
            k_head_dim=fields.get("k_head_dim"),
            v_head_dim=fields.get("v_head_dim"),
            num_k_heads=fields.get("num_k_heads"),
            kernel_size=fields.get("kernel_size"),
            use_gate=fields.get("use_gate"),
            allow_neg_eigval=fields.get("allow_neg_eigval"),
            attention_multiplier=fields.get("attention_multiplier"),
            norm_eps=eps,
            **_gate_from(fields),
        )
    elif kind == "mamba2":
        fields.expect("normalization_function", ("rmsnorm",))
        fields.expect("activation_function", ("silu",))
        limit = fields.get("time_step_limit", [0.0, math.inf])
        if list(limit) != [0.0, math.inf]:
            raise ValueError(f"{fields.where}.time_step_limit: only (0, inf) (no clamp) is implemented, got {limit!r}")
        config = Mamba2Config(
            num_heads=fields.get("num_heads"),
            intermediate_size=fields.get("intermediate_size"),
            state_size=fields.get("state_size"),
            num_groups=fields.get("num_groups"),
            kernel_size=fields.get("conv_kernel_size"),
            chunk_size=fields.get("chunk_size", 256),
            add_bias=fields.get("add_bias", False),
            use_conv_bias=fields.get("use_conv_bias", True),
            norm_eps=eps,
            **_gate_from(fields),
        )
    elif kind == "softmax_attention":
        for key in ("softmax_dropout", "dropout"):
            fields.expect(key, (0, 0.0), 0.0)
        fields.expect("attention_multiplier", (None,), None)
        fields.expect("attention_multiplier_method", ("1 / sqrt(head_dim)",), "1 / sqrt(head_dim)")
        for key in ("attention_gate", "exclusive_self_attention"):
            fields.expect(key, (False,), False)
        fields.expect("sliding_window", (None,), None)
        head_dim = fields.get("head_dim", None)
        if rope and rope_dim is not None and head_dim is not None and rope_dim != head_dim:
            raise ValueError(f"rope_dim: only RoPE over the full head dim ({head_dim}) is implemented, got {rope_dim}")
        config = AttentionConfig(
            num_heads=fields.get("num_attention_heads"),
            num_kv_heads=fields.get("num_key_value_heads"),
            head_dim=head_dim,
            add_bias=fields.get("add_bias", False),
            position_embedding="rope" if rope else "nope",
            rope_theta=float(rope_theta),
        )
    elif kind in ("rnn", "gru"):
        fields.expect("normalization_function", ("rmsnorm",))
        names = ["num_input_heads", "num_weight_heads"]
        if kind == "gru":
            names += [
                "num_forget_input_heads",
                "num_reset_input_heads",
                "num_forget_weight_heads",
                "num_reset_weight_heads",
            ]
        counts = {name: fields.get(name) for name in names}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{fields.where}: only equal head counts are implemented, got {counts}")
        config_class = GRUConfig if kind == "gru" else RNNConfig
        config = config_class(
            num_heads=counts["num_input_heads"],
            head_dim=fields.get("state_head_dim"),
            kernel_size=fields.get("kernel_size"),
            activation_function=fields.get("activation_function"),
            add_bias=fields.get("add_bias"),
            gradient_clipping=fields.get("gradient_clipping"),
        )
    else:
        raise ValueError(f"{fields.where}.sequence_mixer_type: expected one of {sorted(_LETTERS)}, got {kind!r}")
    fields.finish()
    return _LETTERS[kind], config


def _mlp_from(fields: _Fields, router_aux_loss_coef: float | None) -> MLPConfig | MoEConfig:
    kind = fields.expect("mlp_type", ("MLP", "MoE"), "MLP")
    fields.expect("activation_function", ("swiglu",))
    fields.expect("dropout", (0, 0.0), 0.0)
    common = dict(intermediate_size=fields.get("intermediate_size"), add_bias=fields.get("add_bias", False))
    if kind == "MLP":
        config = MLPConfig(**common)
    else:
        fields.expect("shared_expert_gating", (False,), False)
        fields.expect("normalized_topk", (True,), True)
        config = MoEConfig(
            num_experts=fields.get("num_experts"),
            top_k=fields.get("num_experts_per_tok"),
            shared_intermediate_size=fields.get("shared_intermediate_size"),
            router_aux_loss_coef=router_aux_loss_coef or 0.0,
            **common,
        )
    fields.finish()
    return config


def from_lm_engine_config(values: dict, **overrides: Any) -> ModelConfig:
    """Our ModelConfig for an lm-engine ``gpt_base`` config dict; ``overrides`` set JAX-only fields (dtype, ...).

    Raises ValueError naming the first field that has no counterpart or an unsupported value.
    """
    top = _Fields("config", values)
    top.expect("model_type", ("gpt_base", None), "gpt_base")
    top.expect("normalization_function", ("rmsnorm",))
    top.expect("embedding_dropout", (0, 0.0), 0.0)
    for key in ("m_emb", "m_width", "m_residual", "rope_scaling"):
        top.expect(key, (None,), None)
    position = top.expect("position_embedding_type", ("nope", "rope"))
    eps = top.get("layer_norm_epsilon", _DEFAULT_EPS)
    num_layers = top.get("num_layers")
    mixer_blocks, mlp_blocks = top.get("sequence_mixer_blocks"), top.get("mlp_blocks")
    for name, blocks in (("sequence_mixer_blocks", mixer_blocks), ("mlp_blocks", mlp_blocks)):
        if not isinstance(blocks, list) or len(blocks) != num_layers:
            raise ValueError(f"config.{name}: expected a list of num_layers={num_layers} entries, got {blocks!r}")
    rope = position == "rope"
    rope_theta, rope_dim = top.get("rope_theta", 10000), top.get("rope_dim", None)
    pattern, mixers = [], {}
    for i, block in enumerate(mixer_blocks):
        letter, config = _mixer_from(
            _Fields(f"config.sequence_mixer_blocks[{i}]", block), eps, rope, rope_theta, rope_dim
        )
        field = MIXER_FIELDS[letter]
        if mixers.setdefault(field, config) != config:
            raise ValueError(
                f"config.sequence_mixer_blocks[{i}]: every {MIXER_TYPES[letter]} block must have the same config "
                f"(m2rnn-jax has one per mixer type); got {config} after {mixers[field]}"
            )
        pattern.append(letter)
    if rope and "A" not in pattern:
        raise ValueError("config.position_embedding_type: 'rope' needs softmax_attention blocks, found none")
    coef = top.get("router_aux_loss_coef", None)
    mlps = [_mlp_from(_Fields(f"config.mlp_blocks[{i}]", block), coef) for i, block in enumerate(mlp_blocks)]
    if any(mlp != mlps[0] for mlp in mlps):
        raise ValueError("config.mlp_blocks: every layer must have the same MLP config (m2rnn-jax has one)")
    model = ModelConfig(
        vocab_size=top.get("vocab_size"),
        hidden_size=top.get("hidden_size"),
        num_layers=num_layers,
        layer_pattern="".join(pattern),
        mlp=mlps[0],
        initializer_range=top.get("initializer_range", 0.02),
        norm_eps=eps,
        tie_embeddings=top.get("tie_word_embeddings"),
        **mixers,
        **overrides,
    )
    top.finish(_IGNORED_MODEL_FIELDS)
    return model
