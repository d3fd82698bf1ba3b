"""Causal softmax attention (MHA / GQA) with a fixed-size KV cache (SPEC §9.1, §9.2).

Dataflow for x (B, S, h), with Nq query heads, Nkv key/value heads, G = Nq / Nkv and head dim d:

1. ``c_attn``: h -> (Nq + 2 Nkv) d, viewed per KV head as ``[q-group (G d) | k (d) | v (d)]`` (lm-engine layout);
   query head n = kv * G + g reads key/value head n // G.
2. Optional RoPE (θ = 10000 over the full head dim, rotate-half) on q and k; NoPE by default.
3. Causal attention with scale 1/sqrt(d) through ``jax.nn.dot_product_attention``; optional document masking by
   ``segment_ids`` (tokens attend only within their document, :mod:`m2rnn_jax.layers.documents`), also across
   calls: the KV cache keeps the document number of every slot.
4. ``c_proj``: Nq d -> h, depth-scaled init N(0, σ / sqrt(2 L)).

Parameters (Flax path -> lm-engine name; kernels stored transposed, ``kernel = weight.T``):

==================  ==================  ===================  =========================  ===============
Flax path           lm-engine name      Flax shape           init                       logical axes
==================  ==================  ===================  =========================  ===============
c_attn.kernel       c_attn.weight       (h, (Nq + 2Nkv) d)   N(0, σ)                    (embed, heads)
c_attn.bias         c_attn.bias         ((Nq + 2Nkv) d,)     zeros (only if add_bias)   (heads,)
c_proj.kernel       c_proj.weight       (Nq d, h)            N(0, σ / sqrt(2 L))        (heads, embed)
c_proj.bias         c_proj.bias         (h,)                 zeros (only if add_bias)   (embed,)
==================  ==================  ===================  =========================  ===============

The c_attn output axis is KV-head major, so sharding it over ``heads`` in contiguous blocks splits on KV-head
boundaries whenever the shard count divides Nkv.

Implementation: ``implementation="auto"`` (default) asks for cuDNN flash attention on GPU for 16-bit inputs on
the plain causal path (no explicit mask), and XLA otherwise (``jax.nn.dot_product_attention`` itself would pick
XLA when not told); ``"xla"`` / ``"cudnn"`` force one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.documents import document_index
from m2rnn_jax.layers.linear import output_projection_std, sharded_linear
from m2rnn_jax.layers.rope import apply_rope
from m2rnn_jax.layers.validation import init_layer, require_positive_int
from m2rnn_jax.parallel.context.axis import context_axis_size, require_supported
from m2rnn_jax.parallel.context.mixers import causal_attention_over_context
from m2rnn_jax.typing import Dtype

POSITION_EMBEDDINGS = ("nope", "rope")
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Hyper-parameters of causal softmax attention (lm-engine ``SoftmaxAttentionArgs``).

    ``num_kv_heads`` defaults to ``num_heads`` (MHA) and must divide it (GQA); ``head_dim`` defaults to
    ``hidden_size // num_heads`` at construction. ``position_embedding`` is ``"nope"`` (the hybrids) or ``"rope"``
    (the pure-attention baseline).
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    add_bias: bool = False
    position_embedding: str = "nope"
    rope_theta: float = 10000.0
    implementation: str = "auto"

    def __post_init__(self):
        require_positive_int("num_heads", self.num_heads)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        require_positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.head_dim is not None:
            require_positive_int("head_dim", self.head_dim)
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding: expected one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.position_embedding == "rope" and self.head_dim is not None and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: expected an even number with RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta: expected > 0, got {self.rope_theta}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {self.implementation!r}")


class AttentionState(NamedTuple):
    """KV cache of one attention layer.

    key, value: (B, max_length, Nkv, d); slots at and after ``position`` are unused.
    position: () int32, the number of tokens already in the cache (the absolute position of the next token).
    documents: (B, max_length) int32, the document number of every filled slot (0 for the first document of a row;
        +1 at every document start); a query attends only to slots of its own document.
    """

    key: jax.Array
    value: jax.Array
    position: jax.Array
    documents: jax.Array


class Attention(nnx.Module):
    """Causal softmax attention: x (B, S, hidden) -> (y (B, S, hidden), AttentionState).

    ``state=None`` attends within x only (training / prefill without a cache) and returns a cache that is exactly
    full (length S). To keep decoding, pass ``init_state(batch, max_length)``: the S new keys/values are written at
    ``state.position`` and the queries attend to every filled slot. Writing past ``max_length`` cannot be detected
    under jit (positions are traced) and silently corrupts the cache: size the cache for the whole generation.

    Args:
        hidden_size: h.
        config: the mixer's hyper-parameters.
        num_layers: number of layers of the model (depth-scaled init of ``c_proj``).
        initializer_range: σ of the N(0, σ) inits.
        dtype: compute dtype; param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        config: AttentionConfig,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        if config.head_dim is None and hidden_size % config.num_heads != 0:
            raise ValueError(
                f"hidden_size: expected a multiple of num_heads={config.num_heads} when head_dim is None, "
                f"got {hidden_size}"
            )
        self.head_dim = config.head_dim or hidden_size // config.num_heads
        if config.position_embedding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: expected an even number with RoPE, got {self.head_dim}")
        self.group_size = config.num_heads // config.num_kv_heads
        d = self.head_dim

        kw = dict(use_bias=config.add_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_attn = sharded_linear(
            hidden_size,
            (config.num_heads + 2 * config.num_kv_heads) * d,
            ("embed", "heads"),
            std=initializer_range,
            **kw,
        )
        self.c_proj = sharded_linear(
            config.num_heads * d,
            hidden_size,
            ("heads", "embed"),
            std=output_projection_std(initializer_range, num_layers),
            **kw,
        )

    def init_state(self, batch_size: int, max_length: int, dtype: Dtype = jnp.float32) -> AttentionState:
        """Empty cache with room for ``max_length`` tokens: zeros (B, max_length, Nkv, d) and position 0."""
        shape = (batch_size, max_length, self.config.num_kv_heads, self.head_dim)
        return AttentionState(
            key=jnp.zeros(shape, dtype=dtype),
            value=jnp.zeros(shape, dtype=dtype),
            position=jnp.zeros((), dtype=jnp.int32),
            documents=jnp.zeros((batch_size, max_length), dtype=jnp.int32),
        )

    def __call__(
        self, x: jax.Array, state: AttentionState | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, AttentionState]:
        """x (B, S, hidden) -> (y (B, S, hidden) in ``dtype``, new AttentionState).

        segment_ids: optional (B, S) integers; a new document starts where the id changes between neighbouring
        positions, and a token attends only to earlier tokens of its document (document masking, SPEC §0.5).
        Position 0 continues the cache's last document; without ``segment_ids`` every new token does.
        """
        c = self.config
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape (B, S, {self.hidden_size}), got {x.shape}")
        batch, seq_len, _ = x.shape

        d, group = self.head_dim, self.group_size
        qkv = self.c_attn(x.astype(self.dtype)).reshape(batch, seq_len, c.num_kv_heads, group + 2, d)
        q = qkv[:, :, :, :group].reshape(batch, seq_len, c.num_heads, d)
        k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]  # (B, S, Nkv, d)

        start = jnp.zeros((), dtype=jnp.int32) if state is None else state.position
        positions = start + jnp.arange(seq_len, dtype=jnp.int32)  # (S,)
        if c.position_embedding == "rope":
            q, k = apply_rope(q, positions, c.rope_theta), apply_rope(k, positions, c.rope_theta)
        documents = jnp.zeros((batch, seq_len), dtype=jnp.int32)
        if segment_ids is not None:
            documents = document_index(segment_ids, batch, seq_len)

        require_supported("state (cached decoding)", state)
        if state is None and context_axis_size() > 1:  # the sequence is split over devices: K/V around a ring
            out = causal_attention_over_context(q, k, v, scale=self.head_dim**-0.5, segment_ids=segment_ids)
            new_state = AttentionState(key=k, value=v, position=start + seq_len, documents=documents)
        elif state is None:
            mask = None
            if segment_ids is not None:
                causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
                same_document = documents[:, :, None] == documents[:, None, :]
                mask = (causal & same_document)[:, None]  # (B, 1, S, S)
            out = self._attend(q, k, v, mask=mask, is_causal=mask is None)
            new_state = AttentionState(key=k, value=v, position=start + seq_len, documents=documents)
        else:
            self._check_state(state, batch, seq_len)
            last = jax.lax.dynamic_slice_in_dim(state.documents, jnp.maximum(start - 1, 0), 1, axis=1)  # (B, 1)
            documents = last + documents  # position 0 continues the cache's last document
            keys = jax.lax.dynamic_update_slice_in_dim(state.key, k.astype(state.key.dtype), start, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(state.value, v.astype(state.value.dtype), start, axis=1)
            slot_documents = jax.lax.dynamic_update_slice_in_dim(state.documents, documents, start, axis=1)
            slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
            causal = slots[None, :] <= positions[:, None]  # (S, max_length)
            mask = (causal[None] & (slot_documents[:, None, :] == documents[:, :, None]))[:, None]
            out = self._attend(q, keys.astype(self.dtype), values.astype(self.dtype), mask=mask, is_causal=False)
            new_state = AttentionState(key=keys, value=values, position=start + seq_len, documents=slot_documents)
        return self.c_proj(out.reshape(batch, seq_len, c.num_heads * d)), new_state

    def _check_state(self, state: AttentionState, batch: int, seq_len: int) -> None:
        heads, d = self.config.num_kv_heads, self.head_dim
        for name, array in (("key", state.key), ("value", state.value)):
            if array.ndim != 4 or (array.shape[0], array.shape[2], array.shape[3]) != (batch, heads, d):
                raise ValueError(f"state.{name}: expected shape ({batch}, max_length, {heads}, {d}), got {array.shape}")
        if state.documents.shape != state.key.shape[:2]:
            raise ValueError(f"state.documents: expected shape {state.key.shape[:2]}, got {state.documents.shape}")
        if seq_len > state.key.shape[1]:
            raise ValueError(f"x: {seq_len} tokens do not fit a cache of max_length {state.key.shape[1]}")

    def _attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None, is_causal: bool
    ) -> jax.Array:
        """q (B, S, Nq, d), k/v (B, T, Nkv, d) -> (B, S, Nq, d); softmax in >= float32 on the XLA path."""
        scale = self.head_dim**-0.5
        if self._use_cudnn(q, mask):
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=is_causal, implementation="cudnn"
            )
        if q.dtype == jnp.float64:  # jax.nn.dot_product_attention's XLA path takes the softmax in float32
            return _attend_float64(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal, implementation="xla")

    def _use_cudnn(self, q: jax.Array, mask: jax.Array | None) -> bool:
        implementation = self.config.implementation
        if implementation != "auto":
            return implementation == "cudnn"
        return (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and mask is None
            and self.head_dim % 8 == 0
            and self.head_dim <= 128
        )


def _attend_float64(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None, is_causal: bool, scale: float
) -> jax.Array:
    """Softmax attention with every step in float64 (scores, mask, softmax, weighted sum).

    q (B, S, Nq, d), k/v (B, T, Nkv, d) with Nkv dividing Nq (query head n reads kv head n // (Nq / Nkv));
    ``mask`` broadcastable to (B, Nq, S, T), True where a query may attend; ``is_causal`` masks t > s (S == T).
    """
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    grouped = q.reshape(batch, seq_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("bsngd,btnd->bngst", grouped, k) * scale  # (B, Nkv, G, S, T)
    allowed = jnp.ones(scores.shape[-2:], dtype=jnp.bool_)
    if is_causal:
        allowed = jnp.tril(allowed)
    if mask is not None:  # (B or 1, Nq or 1, S, T) -> (B or 1, Nkv or 1, G or 1, S, T)
        mask = jnp.broadcast_to(mask, (mask.shape[0], num_heads) + mask.shape[2:])
        allowed = allowed & mask.reshape(mask.shape[0], num_kv_heads, num_heads // num_kv_heads, *mask.shape[2:])
    weights = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bngst,btnd->bsngd", weights, v)
    return out.reshape(batch, seq_len, num_heads, head_dim)
