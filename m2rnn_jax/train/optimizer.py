"""Optax AdamW with warmup + cosine schedule, weight-decay masks (SPEC §0.4), global-norm clipping, NaN guard."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from m2rnn_jax.train.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over ``warmup_steps``, then cosine to ``min_lr_ratio * peak`` at ``total_steps``."""
    peak = config.learning_rate
    decay_steps = max(total_steps - config.warmup_steps, 1)
    warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    if config.warmup_steps == 0:
        return cosine
    return optax.join_schedules([warmup, cosine], [config.warmup_steps])


def _parameter_name(path: tuple[Any, ...]) -> str:
    """The last named element of a pytree path, skipping the ``.value`` of an ``nnx.Variable`` leaf."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
    return ""


def weight_decay_mask(params: Any, no_decay_names: tuple[str, ...]) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies (the name is not in ``no_decay_names``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _parameter_name(path) not in no_decay_names, params)


def build_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """:func:`clipped_adamw` wrapped in a NaN/Inf guard.

    The guard (``optax.apply_if_finite``) skips an update whose gradients hold a NaN or Inf and counts it
    (``skipped_updates`` reads the count from the optimizer state).
    """
    return optax.apply_if_finite(clipped_adamw(config, total_steps), max_consecutive_errors=MAX_SKIPPED_IN_A_ROW)


MAX_SKIPPED_IN_A_ROW = 1_000_000_000  # the guard never gives up and applies a non-finite update


def clipped_adamw(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if ``grad_clip_norm``) -> AdamW with the schedule and the masked weight decay."""
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=lambda params: weight_decay_mask(params, config.no_decay_names),
        )
    )
    return optax.chain(*parts)


def skipped_updates(opt_state: Any) -> jax.Array:
    """How many updates the NaN/Inf guard has skipped so far (int32 scalar)."""
    return jnp.asarray(opt_state.total_notfinite, dtype=jnp.int32)
