"""A tiny hybrid with every mixer type (and MoE MLPs) trains: jitted AdamW steps lower the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.loss import language_model_loss, next_token_targets
from m2rnn_jax.models.presets import get_preset


def test_tiny_hybrid_of_every_mixer_type_trains():
    config = get_preset("tiny-hybrid-moe")
    assert set(config.layer_pattern) == set("MGSARU")
    model = Decoder(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.01), wrt=nnx.Param)
    # A periodic token stream: learnable from the context, so the loss must fall well below log(vocab).
    period = jax.random.randint(jax.random.key(1), (4, 8), 0, config.vocab_size, dtype=jnp.int32)
    tokens = jnp.tile(period, (1, 3))[:, :17]
    inputs, targets, _, _ = next_token_targets(tokens)

    @nnx.jit
    def train_step(model: Decoder, optimizer: nnx.Optimizer) -> tuple[jax.Array, jax.Array]:
        def loss_fn(model: Decoder):
            loss, metrics = language_model_loss(model, inputs, targets)
            return loss, metrics.aux_loss

        (loss, aux_loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, aux_loss

    losses = []
    for _ in range(12):
        loss, aux_loss = train_step(model, optimizer)
        losses.append(float(loss))
        assert jnp.isfinite(loss) and float(aux_loss) > 0
    assert losses[0] > 0.9 * float(jnp.log(config.vocab_size))
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses[::3], losses[3::3])), losses
