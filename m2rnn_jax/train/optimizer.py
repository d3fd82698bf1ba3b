"""AdamW with warmup + cosine schedule, weight-decay masks (SPEC §0.4), global-norm clipping and a NaN guard: optax's
composition (the reference) and the same update fused into one pass per parameter (the trainer's)."""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2rnn_jax.train.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over ``warmup_steps``, then cosine to ``min_lr_ratio * peak`` at ``total_steps``;
    with ``decay_steps`` the peak holds until ``total_steps - decay_steps`` and the cosine takes the rest."""
    peak = config.learning_rate
    after_warmup = max(total_steps - config.warmup_steps, 1)
    if config.decay_steps is not None and config.decay_steps > after_warmup:
        raise ValueError(
            f"optimizer.decay_steps: expected at most steps - warmup_steps = {after_warmup}, got {config.decay_steps}"
        )
    decay_steps = after_warmup if config.decay_steps is None else config.decay_steps
    pieces, boundaries = [], []
    if config.warmup_steps:
        pieces.append(optax.linear_schedule(0.0, peak, config.warmup_steps))
        boundaries.append(config.warmup_steps)
    if decay_steps < after_warmup:
        pieces.append(optax.constant_schedule(peak))
        boundaries.append(total_steps - decay_steps)
    pieces.append(optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio))
    return pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)


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
    """A pytree like ``params``: True where weight decay applies, i.e. the parameter's name is not in
    ``no_decay_names`` and its ``nnx.Variable`` is not marked ``no_weight_decay=True`` (lm-engine's per-parameter
    marker; the RNN and GRU state weights carry it, SPEC §9.5)."""

    def decays(path: tuple[Any, ...], leaf: Any) -> Any:
        name_decays = _parameter_name(path) not in no_decay_names
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(value=name_decays and not leaf.get_metadata().get("no_weight_decay", False))
        return name_decays

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The trainer's optimizer: :func:`reference_optimizer`'s results and state, computed by :func:`fused_adamw`
    (one elementwise pass over each parameter instead of one per optax stage and a conditional around them)."""
    return fused_adamw(config, total_steps)


def reference_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """:func:`clipped_adamw` wrapped in optax's NaN/Inf guard: the definition :func:`fused_adamw` is tested against.

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


def fused_adamw(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """:func:`reference_optimizer` (clip -> AdamW -> masked decay -> schedule, NaN/Inf guard) as one expression per
    parameter, with the same state pytree (checkpoints and ``skipped_updates`` are unchanged).

    optax runs each stage as its own pass over the parameters and the guard as a ``lax.cond`` around all of them,
    whose branch outputs are materialised before ``apply_updates`` reads them again. Here one reduction gives the
    global norm (clipping, and the guard: the squared norm is finite exactly when every gradient is, unless it
    overflows float32 at a norm above ~1.8e19, where this guard skips and optax's would apply a clipped update), and
    a single elementwise expression per parameter gives the update and both moments, a rejected step selecting
    zero and the old moments. The arithmetic is optax's, operation for operation.
    """
    reference = reference_optimizer(config, total_steps)
    schedule = learning_rate_schedule(config, total_steps)
    b1, b2, eps, clip = config.b1, config.b2, config.eps, config.grad_clip_norm

    def update(grads: Any, state: optax.ApplyIfFiniteState, params: Any = None):
        if params is None:
            raise ValueError("params: expected the parameters (AdamW's weight decay needs them), got None")
        adam, masked, scheduled = state.inner_state[-1]
        g_norm = global_norm(grads)
        finite = jnp.isfinite(g_norm)
        count = optax.safe_increment(adam.count)
        mu_correction, nu_correction = 1 - b1**count, 1 - b2**count
        step_size = -schedule(scheduled.count)
        decay = weight_decay_mask(params, config.no_decay_names)

        def leaf(g, mu, nu, p, decayed):
            weight_decay = config.weight_decay if decayed else 0.0
            hyper = dict(b1=b1, b2=b2, eps=eps, clip=clip, weight_decay=weight_decay)
            return _adamw_leaf(g, mu, nu, p, g_norm, finite, mu_correction, nu_correction, step_size, **hyper)

        results = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, decay)
        outer = jax.tree.structure(grads)
        updates, mu, nu = jax.tree.transpose(outer, jax.tree.structure((0, 0, 0)), results)
        keep_or_increment = lambda c: jnp.where(finite, optax.safe_increment(c), c)
        adam = adam._replace(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu)
        inner = state.inner_state[:-1] + ((adam, masked, scheduled._replace(count=keep_or_increment(scheduled.count))),)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count)),
            last_finite=finite,
            total_notfinite=jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
            inner_state=inner,
        )

    return optax.GradientTransformation(reference.init, update)


@functools.partial(jax.jit, static_argnames=("b1", "b2", "eps", "clip", "weight_decay"))
def _adamw_leaf(
    g: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    p: jax.Array,
    g_norm: jax.Array,
    finite: jax.Array,
    mu_correction: jax.Array,
    nu_correction: jax.Array,
    step_size: jax.Array,
    *,
    b1: float,
    b2: float,
    eps: float,
    clip: float | None,
    weight_decay: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One parameter's (update, new mu, new nu) of :func:`fused_adamw`; a rejected step (``finite`` False) gives a
    zero update and the old moments.

    Jitted so that tracing a train step traces it once per distinct (shape, dtype, hyperparameters) and reuses that
    for every other parameter like it: the scanned 7B hybrid has 539 parameter arrays, and tracing its optimizer one
    array at a time took 2.7 of the 6.4 s of its train step's profiled trace (XLA inlines the calls: the compiled
    step is the same; experiments/RESULTS.md, session 21).
    """
    if clip is not None:
        g = jax.lax.select(g_norm < clip, g, (g / g_norm.astype(g.dtype)) * clip)
    mu_new = (1 - b1) * g + b1 * mu
    nu_new = (1 - b2) * (g**2) + b2 * nu
    u = (mu_new / mu_correction.astype(mu_new.dtype)) / (
        jnp.sqrt(nu_new / nu_correction.astype(nu_new.dtype) + 0.0) + eps
    )
    if weight_decay != 0.0:
        u = u + weight_decay * p
    u = jnp.array(step_size, dtype=u.dtype) * u
    return (
        jnp.where(finite, u, jnp.zeros_like(u)),
        jnp.where(finite, mu_new, mu).astype(mu.dtype),
        jnp.where(finite, nu_new, nu).astype(nu.dtype),
    )


def global_norm(tree: Any) -> jax.Array:
    """``optax.tree.norm(tree)`` (the same operations in the same order: the sum over leaves of each leaf's sum of
    squares, then the square root), with each leaf's sum of squares traced once per distinct shape and dtype."""
    return jnp.sqrt(functools.reduce(operator.add, (_sum_of_squares(leaf) for leaf in jax.tree.leaves(tree)), 0))


@jax.jit
def _sum_of_squares(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x))


def skipped_updates(opt_state: Any) -> jax.Array:
    """How many updates the NaN/Inf guard has skipped so far (int32 scalar)."""
    return jnp.asarray(opt_state.total_notfinite, dtype=jnp.int32)
