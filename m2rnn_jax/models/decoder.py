"""The hybrid decoder (SPEC §9.1): embeddings, pre-norm blocks from a layer pattern, final RMSNorm, LM head.

Each block computes ``x += mixer(norm1(x)); x += mlp(norm2(x))``. The mixer of block i is chosen by the letter
``config.layer_pattern[i]`` (see :mod:`m2rnn_jax.models.config`). Parameter paths and their lm-engine names:

=====================================  ====================================  ==================
Flax path                              lm-engine name                        shape
=====================================  ====================================  ==================
``embed.embedding``                    ``transformer.wte.weight``            (vocab, h)
``blocks.{i}.norm1.scale``             ``transformer.h.{i}.ln_1.weight``     (h,)
``blocks.{i}.mixer.*``                 ``transformer.h.{i}.sequence_mixer.*``  per mixer
``blocks.{i}.norm2.scale``             ``transformer.h.{i}.ln_2.weight``     (h,)
``blocks.{i}.mlp.*``                   ``transformer.h.{i}.mlp_block.*``     per channel mixer
``final_norm.scale``                   ``transformer.ln_f.weight``           (h,)
``lm_head.kernel``                     ``lm_head.weight`` (transposed)       (h, vocab)
=====================================  ====================================  ==================

The decoder carries a *cache*: a tuple with one mixer state per block (conv tail + recurrent state, or the
attention KV buffer). ``cache=None`` starts every mixer from zeros; the returned cache continues the sequence, so
running S tokens at once equals running them one at a time (see :mod:`m2rnn_jax.models.generation`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.mlp import MLP, MoE, MoEConfig
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.layer_scan import Segment, layer_plan, run_segment
from m2rnn_jax.models.mixers import MIXERS, mixer_spec

# Layer-pattern letter -> sequence-mixer class (a view of the registry in models/mixers.py).
MIXER_CLASSES: dict[str, type[nnx.Module]] = {spec.letter: spec.module_class for spec in MIXERS}

Cache = tuple[Any, ...]


class DecoderOutput(NamedTuple):
    """What :class:`Decoder` returns.

    Attributes:
        logits: (B, S, vocab) in the compute dtype; None when called with ``return_hidden=True``.
        cache: one mixer state per block; feed it back to continue the sequence.
        aux_loss: scalar in promote_types(float32, compute dtype), the sum over blocks of the MoE auxiliary losses
            (0 for dense MLPs), already weighted by ``router_aux_loss_coef``.
        hidden: (B, S, h) final-normed hidden states in the compute dtype (the LM head's input) when called with
            ``return_hidden=True``, else None.
    """

    logits: jax.Array | None
    cache: Cache
    aux_loss: jax.Array
    hidden: jax.Array | None = None


class DecoderBlock(nnx.Module):
    """One pre-norm block: ``x += mixer(norm1(x)); x += mlp(norm2(x))``.

    Args:
        letter: the mixer letter of this block (``M G S A R U``).
        config: the model config (mixer and channel-mixer configs, widths, dtypes, init).
        rngs: parameter initialisation keys.
    """

    def __init__(self, letter: str, config: ModelConfig, *, rngs: nnx.Rngs):
        spec = mixer_spec(letter)
        hidden = config.hidden_size
        common = dict(
            num_layers=config.num_layers,
            initializer_range=config.initializer_range,
            dtype=config.compute_dtype,
            param_dtype=config.parameter_dtype,
            rngs=rngs,
        )
        norm_args = dict(eps=config.norm_eps, dtype=config.compute_dtype, param_dtype=config.parameter_dtype)
        self.letter = letter
        self.norm1 = RMSNorm(hidden, **norm_args)
        self.mixer = spec.module_class(hidden, config.mixer_config(letter), **common)
        self.norm2 = RMSNorm(hidden, **norm_args)
        channel_mixer_class = MoE if isinstance(config.mlp, MoEConfig) else MLP
        self.mlp = channel_mixer_class(hidden, config.mlp, **common)

    def __call__(
        self, x: jax.Array, state: Any = None, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, Any, jax.Array]:
        """x (B, S, h) -> (x (B, S, h), new mixer state, aux loss (scalar, >= float32)).

        segment_ids: optional (B, S) document ids, given to the mixer (part of the
        :class:`~m2rnn_jax.layers.mixer.SequenceMixer` interface): each new document starts from a zero state and
        conv tail, attention stays within a document.
        """
        mixed, new_state = self.mixer(self.norm1(x), state, segment_ids=segment_ids)
        x = x + mixed.astype(x.dtype)
        if isinstance(self.mlp, MoE):
            channel, aux_loss = self.mlp(self.norm2(x))
        else:
            channel, aux_loss = self.mlp(self.norm2(x)), jnp.zeros((), dtype=jnp.promote_types(jnp.float32, x.dtype))
        return x + channel.astype(x.dtype), new_state, aux_loss.astype(jnp.promote_types(jnp.float32, x.dtype))


def _run_block(
    block: DecoderBlock, x: jax.Array, state: Any, segment_ids: jax.Array | None
) -> tuple[jax.Array, Any, jax.Array]:
    return block(x, state, segment_ids)


# ModelConfig.remat (see REMAT_CHOICES in models/config.py) -> the nnx.remat policy of each block ("none": no remat).
REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_runner(remat: str) -> Any:
    """``_run_block``, wrapped in ``nnx.remat`` with the policy that ``remat`` names."""
    if remat == "none":
        return _run_block
    return nnx.remat(_run_block, policy=REMAT_POLICIES[remat])


def embed_tokens(table: jax.Array, input_ids: jax.Array, dtype: Any) -> jax.Array:
    """(V, h) embedding table (parameter dtype), (B, S) ids -> (B, S, h) rows in ``dtype``.

    Gathers the rows from the stored table and casts only them, so the gradient is a scatter-add in the table's
    dtype: repeated ids sum in float32, as PyTorch's embedding under autocast (``nnx.Embed`` casts the whole table
    to the compute dtype first and sums the gradient in bf16). Out-of-range ids give NaN rows, as ``nnx.Embed``.
    On the H200 (B=8, S=4096, V=100352, h=1024) forward+backward take 0.26 ms (``nnx.Embed``'s way 0.55 ms;
    ``experiments/bench/embedding_check.py``).
    """
    return jnp.take(table, input_ids, axis=0).astype(dtype)


class Decoder(nnx.Module):
    """The hybrid language model of SPEC §9-§10.

    Args:
        config: the model config (see :class:`~m2rnn_jax.models.config.ModelConfig`).
        rngs: parameter initialisation keys (``nnx.Rngs(seed)``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config: expected ModelConfig, got {type(config).__name__}")
        self.config = config
        normal = nnx.initializers.normal(stddev=config.initializer_range)
        self.embed = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.compute_dtype,
            param_dtype=config.parameter_dtype,
            embedding_init=normal,
            embedding_metadata={"out_sharding": ("vocab", "embed"), "eager_sharding": False},
            rngs=rngs,
        )
        self.blocks = nnx.List([DecoderBlock(letter, config, rngs=rngs) for letter in config.layer_pattern])
        self.final_norm = RMSNorm(
            config.hidden_size, eps=config.norm_eps, dtype=config.compute_dtype, param_dtype=config.parameter_dtype
        )
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=config.compute_dtype,
                param_dtype=config.parameter_dtype,
                kernel_init=normal,
                kernel_metadata={"out_sharding": ("embed", "vocab"), "eager_sharding": False},
                rngs=rngs,
            )

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> Cache:
        """Empty per-block mixer states: recurrent states of zeros, attention KV buffers of ``max_length``.

        ``dtype`` defaults to ``promote_types(float32, compute dtype)`` (float32, or float64 for float64 models).
        """
        if dtype is None:
            dtype = jnp.promote_types(jnp.float32, self.config.compute_dtype)
        return tuple(block.mixer.init_state(batch_size, max_length, dtype=dtype) for block in self.blocks)

    def head_kernel(self) -> jax.Array:
        """The LM head kernel (h, vocab): ``lm_head.kernel``, or ``embed.embedding.T`` for tied embeddings (in the
        parameter dtype; the head casts it to the compute dtype)."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def _run_blocks(
        self, x: jax.Array, cache: Cache, segment_ids: jax.Array | None
    ) -> tuple[jax.Array, list[Any], jax.Array]:
        """x (B, S, h) through every block -> (x, new per-block states, summed aux loss); with ``scan_layers``
        the segments of :func:`~m2rnn_jax.models.layer_scan.layer_plan` (each run of equal mixer letters longer
        than one block, or each period of runs repeated back to back) are one ``lax.scan`` each, else one call per
        block."""
        run_block = _block_runner(self.config.remat)
        aux_loss = jnp.zeros((), dtype=jnp.promote_types(jnp.float32, self.config.compute_dtype))
        if self.config.scan_layers:
            plan = layer_plan(self.config.layer_pattern)
        else:
            plan = [Segment(i, (1,)) for i in range(len(self.blocks))]
        new_cache: list[Any] = []
        for segment in plan:
            blocks = [self.blocks[i] for i in range(segment.start, segment.stop)]
            states = cache[segment.start : segment.stop]
            x, new_states, segment_aux_loss = run_segment(blocks, segment, x, states, segment_ids, run_block)
            new_cache.extend(new_states)
            aux_loss = aux_loss + segment_aux_loss
        return x, new_cache, aux_loss

    def __call__(
        self,
        input_ids: jax.Array,
        cache: Cache | None = None,
        *,
        segment_ids: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> DecoderOutput:
        """input_ids (B, S) int -> :class:`DecoderOutput` (logits (B, S, vocab), or hidden (B, S, h)).

        Args:
            input_ids: (B, S) token ids.
            cache: ``None`` (start from empty states) or the cache returned by a previous call / ``init_cache``.
            segment_ids: optional (B, S) document ids for document masking (SPEC §0.5; None, the paper's default,
                ignores document boundaries): a new document starts where the id changes between neighbouring
                positions; every mixer starts it from a zero state and conv tail and attention stays inside it.
                Position 0 continues ``cache``.
            return_hidden: return the final-normed hidden states instead of the logits (for the chunked head +
                loss of :mod:`m2rnn_jax.models.lm_head_loss`, which never holds all (B, S, vocab) logits).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (B, S), got {input_ids.shape}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment_ids: expected shape {input_ids.shape}, got {segment_ids.shape}")
        if cache is None:
            cache = (None,) * len(self.blocks)
        elif len(cache) != len(self.blocks):
            raise ValueError(f"cache: expected {len(self.blocks)} per-block states, got {len(cache)}")
        x = embed_tokens(self.embed.embedding[...], input_ids, self.config.compute_dtype)
        x, new_cache, aux_loss = self._run_blocks(x, cache, segment_ids)
        x = self.final_norm(x)
        if return_hidden:
            return DecoderOutput(logits=None, cache=tuple(new_cache), aux_loss=aux_loss, hidden=x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        return DecoderOutput(logits=logits, cache=tuple(new_cache), aux_loss=aux_loss)
