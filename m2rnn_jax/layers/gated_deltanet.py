"""Gated DeltaNet sequence mixer (SPEC §9.4), with a chunked-parallel form for training and a recurrent form.

Per v-head, with state S (dk, dv), L2-normalised q, k, scale = 1/sqrt(dk) (or ``attention_multiplier``),
β_t = σ(b_t) (× 2 with ``allow_neg_eigval``) and log α_t = -exp(A_log) softplus(a_t + dt_bias) (the shared decay
gate of SPEC §2.3):

    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,        o_t = S_tᵀ (scale · q_t)

The recurrence is the op :func:`m2rnn_jax.ops.gated_delta_rule` (chunked WY form, the fused GPU backend, or the
step-by-step form; ``GatedDeltaNetConfig.backend``). With ``segment_ids`` every new document starts from a zero
state and conv tail (:mod:`m2rnn_jax.layers.documents`; the op's ``reset``).

Layer dataflow for x (B, S, h): ``qkv_proj`` -> causal conv (SiLU, no bias) on [q | k | v] -> q, k repeated to
Nv heads (contiguous blocks) -> recurrence -> ``o * SiLU(gate)`` -> per-head RMSNorm over dv (one scale shared by
the heads) -> ``o_proj``. ``ab_proj`` gives [a (Nv) | b (Nv) | gate (Nv dv)] and is not convolved.

Parameters (Flax path -> lm-engine name; kernels stored transposed):

=======================  =========================  ===========================  =====================  ===============
Flax path                lm-engine name             Flax shape                   init                   logical axes
=======================  =========================  ===========================  =====================  ===============
qkv_proj.kernel          qkv_proj.weight            (h, 2 Nk dk + Nv dv)         N(0, σ)                (embed, None)
ab_proj.kernel           ab_proj.weight             (h, 2 Nv [+ Nv dv])          N(0, σ)                (embed, None)
qkv_conv1d.kernel        qkv_conv1d.weight (C,1,ks)  (ks, 2 Nk dk + Nv dv)       N(0, σ)                (None, None)
decay_gate.A_log         decay_gate.A_log           (Nv,) >= float32             log U(0, 16)           (heads,)
decay_gate.dt_bias       decay_gate.dt_bias         (Nv,) >= float32             SPEC §2.3              (heads,)
o_norm.scale             o_norm.weight              (dv,)                        ones                   (None,)
o_proj.kernel            o_proj.weight              (Nv dv, h)                   N(0, σ / sqrt(2 L))    (heads, embed)
=======================  =========================  ===========================  =====================  ===============
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.conv import CausalDepthwiseConv1d
from m2rnn_jax.layers.decay_gate import SoftplusDecayGate, validate_decay_gate_init
from m2rnn_jax.layers.documents import document_starts
from m2rnn_jax.layers.gated_norm import gated_rms_norm
from m2rnn_jax.layers.linear import linear_blocks, output_projection_std, sharded_linear
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.validation import init_layer, require_positive_int
from m2rnn_jax.ops.gated_delta_rule import gated_delta_rule
from m2rnn_jax.ops.gated_delta_rule.op import BACKENDS
from m2rnn_jax.parallel.context.axis import context_axis_size
from m2rnn_jax.parallel.context.mixers import gated_delta_rule_over_context
from m2rnn_jax.typing import Dtype

L2_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Hyper-parameters of Gated DeltaNet (lm-engine ``GatedDeltaNetArgs``; 400M: 2 heads, dk 256, dv 512).

    ``num_heads`` is Nv (the state heads); ``num_k_heads`` (Nk, default Nv) must divide it. ``chunk_size`` is the
    chunk length of the training form; ``attention_multiplier`` None means 1/sqrt(dk). ``backend`` is the op's
    backend for sequences longer than one token (:func:`m2rnn_jax.ops.gated_delta_rule`: "auto", "chunked",
    "recurrent", "pallas_gpu").
    """

    num_heads: int
    k_head_dim: int = 256
    v_head_dim: int = 512
    num_k_heads: int | None = None
    kernel_size: int = 4
    use_gate: bool = True
    allow_neg_eigval: bool = False
    attention_multiplier: float | None = None
    chunk_size: int = 64
    norm_eps: float = 1e-5
    A_init_min: float = 0.0
    A_init_max: float = 16.0
    dt_init_min: float = 1e-3
    dt_init_max: float = 0.1
    dt_init_floor: float = 1e-4
    backend: str = "auto"

    def __post_init__(self):
        if self.num_k_heads is None:
            object.__setattr__(self, "num_k_heads", self.num_heads)
        for name in ("num_heads", "k_head_dim", "v_head_dim", "num_k_heads", "kernel_size", "chunk_size"):
            require_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_k_heads != 0:
            raise ValueError(f"num_k_heads: expected a divisor of num_heads={self.num_heads}, got {self.num_k_heads}")
        if self.attention_multiplier is not None and not self.attention_multiplier > 0:
            raise ValueError(f"attention_multiplier: expected None or > 0, got {self.attention_multiplier}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {self.backend!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps}")
        validate_decay_gate_init(
            self.A_init_min, self.A_init_max, self.dt_init_min, self.dt_init_max, self.dt_init_floor
        )

    @property
    def conv_channels(self) -> int:
        """2 Nk dk + Nv dv: the [q | k | v] channels of ``qkv_proj`` and the conv."""
        return 2 * self.num_k_heads * self.k_head_dim + self.num_heads * self.v_head_dim


class GatedDeltaNetState(NamedTuple):
    """Decoding state: conv (B, kernel_size - 1, 2 Nk dk + Nv dv) raw pre-conv inputs; recurrent (B, Nv, dk, dv)."""

    conv: jax.Array
    recurrent: jax.Array


def l2_normalize(x: jax.Array, scale: float, dtype: Dtype) -> jax.Array:
    """x (..., d) -> ``scale * x / sqrt(sum(x**2, -1) + 1e-6)`` in ``dtype``, computed in
    ``promote_types(float32, x.dtype)``.

    The backward is written out (``dx = scale * n * (dy - x_hat * sum(dy * x_hat))``, n the inverse norm, x_hat =
    n x), recomputing n from x: it keeps only x in its own dtype where autodiff kept float32 copies of the inputs.
    """
    return _l2_normalize(float(scale), jnp.dtype(dtype), x)


def _inverse_norm(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + L2_NORM_EPS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _l2_normalize(scale: float, dtype: jnp.dtype, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.promote_types(jnp.float32, x.dtype))
    return (x * _inverse_norm(x) * scale).astype(dtype)


def _l2_normalize_forward(scale: float, dtype: jnp.dtype, x: jax.Array):
    return _l2_normalize(scale, dtype, x), x


def _l2_normalize_backward(scale: float, dtype: jnp.dtype, x_in: jax.Array, dy: jax.Array):
    x = x_in.astype(jnp.promote_types(jnp.float32, x_in.dtype))
    inverse_norm = _inverse_norm(x)
    x_hat = x * inverse_norm
    dy = dy.astype(x.dtype)
    dx = scale * inverse_norm * (dy - x_hat * jnp.sum(dy * x_hat, axis=-1, keepdims=True))
    return (dx.astype(x_in.dtype),)


_l2_normalize.defvjp(_l2_normalize_forward, _l2_normalize_backward)


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet mixer: x (B, S, hidden) -> (y (B, S, hidden), GatedDeltaNetState).

    Sequences longer than one token use the op's ``config.backend`` (chunk length ``chunk_size``), a single token
    the recurrent step; both continue from ``state`` (None = zeros). q, k, v reach the op in ``dtype`` (bf16
    layers feed the fused kernels bf16; the op accumulates in float32); beta and the decay stay in
    ``promote_types(float32, dtype)``. When ``state`` is None the new state is kept in that dtype too; a given
    state keeps its dtypes.
    """

    def __init__(
        self,
        hidden_size: int,
        config: GatedDeltaNetConfig,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        c = config
        Nv, dv = c.num_heads, c.v_head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = sharded_linear(hidden_size, c.conv_channels, ("embed", None), std=initializer_range, **kw)
        self.ab_proj = sharded_linear(
            hidden_size, 2 * Nv + (Nv * dv if c.use_gate else 0), ("embed", None), std=initializer_range, **kw
        )
        self.qkv_conv1d = CausalDepthwiseConv1d(
            c.conv_channels,
            c.kernel_size,
            activation="silu",
            use_bias=False,
            initializer_range=initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.decay_gate = SoftplusDecayGate(
            Nv,
            A_init_min=c.A_init_min,
            A_init_max=c.A_init_max,
            dt_init_min=c.dt_init_min,
            dt_init_max=c.dt_init_max,
            dt_init_floor=c.dt_init_floor,
            dtype=jnp.promote_types(jnp.float32, dtype),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.o_norm = RMSNorm(dv, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype, scale_sharding=None)
        self.o_proj = sharded_linear(
            Nv * dv, hidden_size, ("heads", "embed"), std=output_projection_std(initializer_range, num_layers), **kw
        )

    def init_state(self, batch_size: int, max_length: int, dtype: Dtype = jnp.float32) -> GatedDeltaNetState:
        """Zero state (``max_length`` is ignored: the state has a fixed size)."""
        c = self.config
        return GatedDeltaNetState(
            conv=self.qkv_conv1d.init_state(batch_size, dtype=dtype),
            recurrent=jnp.zeros((batch_size, c.num_heads, c.k_head_dim, c.v_head_dim), dtype=dtype),
        )

    def __call__(
        self, x: jax.Array, state: GatedDeltaNetState | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, GatedDeltaNetState]:
        """x (B, S, hidden) -> (y (B, S, hidden) in ``dtype``, new GatedDeltaNetState).

        segment_ids: optional (B, S) integer document ids; a new document starts where the id differs from the
        previous position's (position 0 continues ``state``) and runs from a zero state and conv tail.
        """
        c = self.config
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape (B, S, {self.hidden_size}), got {x.shape}")
        batch, seq_len, _ = x.shape
        compute_dtype = jnp.promote_types(jnp.float32, self.dtype)
        if state is None:
            state = self.init_state(batch, seq_len, dtype=compute_dtype)
        Nv, Nk, dk, dv = c.num_heads, c.num_k_heads, c.k_head_dim, c.v_head_dim

        x = x.astype(self.dtype)
        # a, b [, gate] from their own column blocks of ab_proj's kernel: no concatenate of their gradients
        a, b, *gate = linear_blocks(self.ab_proj, x, (Nv, Nv) + ((Nv * dv,) if c.use_gate else ()))
        reset = None if segment_ids is None else document_starts(segment_ids, batch, seq_len)
        qkv, conv_state = self.qkv_conv1d(self.qkv_proj(x), state.conv, segment_ids=segment_ids)
        q, k, v = jnp.split(qkv, [Nk * dk, 2 * Nk * dk], axis=-1)  # in dtype (the conv's output)
        scale = c.attention_multiplier if c.attention_multiplier is not None else dk**-0.5
        q, k = (
            jnp.repeat(l2_normalize(t.reshape(batch, seq_len, Nk, dk), s, self.dtype), Nv // Nk, axis=2)
            for t, s in ((q, scale), (k, 1.0))
        )
        v = v.reshape(batch, seq_len, Nv, dv).astype(self.dtype)
        beta = jax.nn.sigmoid(b.astype(compute_dtype)) * (2.0 if c.allow_neg_eigval else 1.0)
        log_alpha = self.decay_gate(a, final_exponential=False)  # (B, S, Nv) in compute_dtype

        backend = "recurrent" if seq_len == 1 else c.backend
        delta_rule = gated_delta_rule_over_context if context_axis_size() > 1 else gated_delta_rule
        o, recurrent = delta_rule(
            q, k, v, beta, log_alpha, state.recurrent, reset=reset, chunk_size=c.chunk_size, backend=backend
        )
        if c.use_gate:  # per head over dv, output in dtype; one fused backward (layers/gated_norm.py)
            norm = self.o_norm
            gate = gate[0].reshape(batch, seq_len, Nv, dv)
            o = gated_rms_norm(o, gate, norm.scale[...], eps=norm.eps, dtype=norm.dtype)
        else:
            o = self.o_norm(o.astype(compute_dtype))
        y = self.o_proj(o.reshape(batch, seq_len, Nv * dv))
        return y, GatedDeltaNetState(conv=conv_state, recurrent=recurrent.astype(state.recurrent.dtype))
