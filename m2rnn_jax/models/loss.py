"""Language-model losses: masked token cross-entropy in float32 plus the MoE auxiliary loss.

Training goes through :func:`head_loss_sums`, which runs the decoder to its final hidden states and the chunked
LM head + cross-entropy of :mod:`m2rnn_jax.models.lm_head_loss` (no (B, S, vocab) float32 logits);
:func:`cross_entropy` is the plain version on full logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.lm_head_loss import LMHeadLoss, lm_head_cross_entropy


class LossMetrics(NamedTuple):
    """Scalars reported next to the loss (all float32 except ``num_tokens``, int32)."""

    cross_entropy: jax.Array
    aux_loss: jax.Array
    num_tokens: jax.Array


def cross_entropy(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy, computed in float32.

    Args:
        logits: (B, S, vocab), any float dtype.
        targets: (B, S) int token ids.
        loss_mask: optional (B, S), nonzero where the token counts.

    Returns:
        (mean cross-entropy over the counted tokens (0 if none), number of counted tokens (int32)).
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets: expected shape {logits.shape[:2]} matching logits (B, S, vocab) {logits.shape}, "
            f"got {targets.shape}"
        )
    if loss_mask is None:
        loss_mask = jnp.ones(targets.shape, dtype=jnp.float32)
    elif loss_mask.shape != targets.shape:
        raise ValueError(f"loss_mask: expected shape {targets.shape}, got {loss_mask.shape}")
    weights = (loss_mask != 0).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    num_tokens = jnp.sum(weights)
    mean = jnp.sum(token_nll * weights) / jnp.maximum(num_tokens, 1.0)
    return mean, num_tokens.astype(jnp.int32)


def next_token_targets(
    tokens: jax.Array, loss_mask: jax.Array | None = None, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Splits a (B, S+1) token window into inputs ``tokens[:, :-1]`` and next-token targets ``tokens[:, 1:]``.

    ``loss_mask`` (B, S+1) is taken on the target side, ``segment_ids`` (B, S+1) on the input side.

    Returns:
        (inputs (B, S), targets (B, S), loss_mask (B, S) or None, segment_ids (B, S) or None).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens: expected shape (B, S+1) with S >= 1, got {tokens.shape}")
    for name, value in (("loss_mask", loss_mask), ("segment_ids", segment_ids)):
        if value is not None and value.shape != tokens.shape:
            raise ValueError(f"{name}: expected shape {tokens.shape}, got {value.shape}")
    return (
        tokens[:, :-1],
        tokens[:, 1:],
        None if loss_mask is None else loss_mask[:, 1:],
        None if segment_ids is None else segment_ids[:, :-1],
    )


def head_loss_sums(
    model: Decoder,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    loss_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    groups: int = 1,
) -> tuple[LMHeadLoss, jax.Array]:
    """The decoder's summed token cross-entropy through the chunked LM head, and its MoE aux loss.

    Args:
        model: the decoder (tied or untied head).
        inputs: (B, S) token ids.
        targets: (B, S) token ids to predict at each position.
        loss_mask: optional (B, S), nonzero where a target counts (weight 1), else weight 0.
        segment_ids: optional (B, S) document ids, passed to the mixers that support document masking.
        chunk_size: tokens per chunk of the head (default: :func:`~m2rnn_jax.models.lm_head_loss.default_num_chunks`).
        groups: contiguous token groups of the head: the number of devices the batch rows are split over (1 on one
            device; see :mod:`m2rnn_jax.models.lm_head_loss`). The model config's ``head_statistics`` applies with
            one group; with several the jnp statistics run (the fused kernel cannot be split by XLA). Its
            ``head_logits`` sets the dtype of the logits ("fused_matmul" writes none).

    Returns:
        (:class:`~m2rnn_jax.models.lm_head_loss.LMHeadLoss` with ``correct`` shaped (B, S), aux loss (scalar f32)).
    """
    if targets.shape != inputs.shape:
        raise ValueError(f"targets: expected shape {inputs.shape} matching inputs, got {targets.shape}")
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(f"loss_mask: expected shape {targets.shape}, got {loss_mask.shape}")
    output = model(inputs, segment_ids=segment_ids, return_hidden=True)
    batch, seq_len, width = output.hidden.shape
    weights = None if loss_mask is None else (loss_mask != 0).astype(jnp.float32).reshape(-1)
    statistics = model.config.head_statistics if groups == 1 else "two_pass"
    in_compute_dtype = model.config.head_logits == "compute" and statistics != "fused_matmul"  # it writes none
    head = lm_head_cross_entropy(
        output.hidden.reshape(batch * seq_len, width),
        model.head_kernel(),
        targets.reshape(-1),
        weights,
        chunk_size=chunk_size,
        compute_dtype=model.config.compute_dtype,
        groups=groups,
        statistics=statistics,
        logits_dtype=model.config.compute_dtype if in_compute_dtype else None,
    )
    return head._replace(correct=head.correct.reshape(batch, seq_len)), output.aux_loss


def language_model_loss(
    model: Decoder,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    loss_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, LossMetrics]:
    """Training objective: masked cross-entropy of ``model(inputs)`` against ``targets`` plus the MoE aux loss.

    Args:
        model: the decoder.
        inputs: (B, S) token ids.
        targets: (B, S) token ids to predict at each position (next tokens for language modelling; any per-position
            labels for tasks such as state tracking).
        loss_mask: optional (B, S), nonzero where a target counts.
        segment_ids: optional (B, S) document ids, passed to the mixers that support document masking.

    Returns:
        (scalar float32 loss, :class:`LossMetrics`).
    """
    head, aux_loss = head_loss_sums(model, inputs, targets, loss_mask=loss_mask, segment_ids=segment_ids)
    mean_cross_entropy = head.nll_sum / jnp.maximum(head.weight_sum, 1.0)
    return mean_cross_entropy + aux_loss, LossMetrics(
        cross_entropy=mean_cross_entropy, aux_loss=aux_loss, num_tokens=head.weight_sum.astype(jnp.int32)
    )
