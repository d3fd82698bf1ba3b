"""The jitted train and eval steps (pure functions of the state and a batch).

A batch is a dict of (B, S) arrays: ``inputs`` (token ids), ``targets`` (token ids to predict at each position),
optionally ``loss_mask`` (nonzero where a target counts) and ``segment_ids`` (document ids for document masking).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2rnn_jax.models.loss import head_loss_sums
from m2rnn_jax.parallel.rules import LOGICAL_AXIS_RULES
from m2rnn_jax.train.batch_checks import check_batch
from m2rnn_jax.train.optimizer import global_norm, skipped_updates
from m2rnn_jax.train.state import TrainState

Batch = dict[str, jax.Array]
SUM_KEYS = ("cross_entropy_sum", "aux_loss", "correct", "tokens", "correct_last", "rows")


def _batch_shards() -> int:
    """How many ways the mesh the step is traced under (``jax.set_mesh``) splits the batch; 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes.get(axis, 1) for axis in LOGICAL_AXIS_RULES["batch"])


def _forward(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and per-batch sums for one (micro-)batch (the LM head + cross-entropy run chunked, see
    :mod:`m2rnn_jax.models.lm_head_loss`, one token group per batch shard so that each device accumulates its own
    head gradient)."""
    model = nnx.merge(graphdef, params)
    check_batch(batch, model.config.vocab_size)  # opt-in value checks (M2RNN_JAX_CHECKS=1), nothing otherwise
    head, aux_loss = head_loss_sums(
        model,
        batch["inputs"],
        batch["targets"],
        loss_mask=batch.get("loss_mask"),
        segment_ids=batch.get("segment_ids"),
        groups=min(_batch_shards(), batch["inputs"].size),
    )
    sums = {
        "cross_entropy_sum": head.nll_sum,
        "aux_loss": aux_loss,
        "correct": jnp.sum(head.correct),
        "tokens": head.weight_sum,
        "correct_last": jnp.sum(head.correct[:, -1]),
        "rows": jnp.asarray(head.correct.shape[0], jnp.float32),
    }
    return head.nll_sum / jnp.maximum(head.weight_sum, 1.0) + aux_loss, sums


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """(B, ...) -> (num_micro, B / num_micro, ...), taking rows j * num_micro + i into micro-batch i so that a
    batch split over devices in contiguous blocks stays split the same way in every micro-batch."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (new_state, metrics)``; metrics are float32 scalars.

    With ``grad_accum_steps > 1`` the batch is cut into that many micro-batches whose gradients are summed
    (weighted by their token counts, so the result equals the full-batch gradient of the mean loss).
    A NaN/Inf gradient skips the update (params and moments unchanged) and increments ``skipped``.
    """
    grad_fn = jax.value_and_grad(lambda p, b: _forward(graphdef, p, b), has_aux=True)

    def gradients(params: nnx.State, batch: Batch) -> tuple[nnx.State, dict[str, jax.Array]]:
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(params, batch)
            return grads, sums

        def accumulate(carry, micro_batch):
            grad_sum, sums_total = carry
            (_, sums), grads = grad_fn(params, micro_batch)
            grad_sum = jax.tree.map(lambda a, g: a + g * sums["tokens"], grad_sum, grads)
            return (grad_sum, jax.tree.map(jnp.add, sums_total, sums)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zero_sums = {key: jnp.zeros((), jnp.float32) for key in SUM_KEYS}
        (grad_sum, sums), _ = jax.lax.scan(
            accumulate, (zeros, zero_sums), _split_micro_batches(batch, grad_accum_steps)
        )
        sums["aux_loss"] = sums["aux_loss"] / grad_accum_steps
        return jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grad_sum), sums

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, sums = gradients(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        tokens = jnp.maximum(sums["tokens"], 1.0)
        cross_entropy_mean = sums["cross_entropy_sum"] / tokens
        metrics = {
            "loss": cross_entropy_mean + sums["aux_loss"],
            "cross_entropy": cross_entropy_mean,
            "accuracy": sums["correct"] / tokens,
            "grad_norm": global_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": sums["tokens"],
            "skipped_updates": skipped_updates(opt_state).astype(jnp.float32),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> sums`` (float32 scalars, see :data:`SUM_KEYS`): cross-entropy sum, aux loss,
    correct and counted tokens, and correct answers / rows at the last position (the state-tracking final answer)."""

    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        return _forward(graphdef, params, batch)[1]

    return eval_step
