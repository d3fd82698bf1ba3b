"""A tiny state-tracking training config shared by the trainer, CLI and sharding tests (seconds to compile)."""

from __future__ import annotations

from m2rnn_jax.train.config import CheckpointConfig, DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from m2rnn_jax.train.presets import state_tracking_model


def tiny_train_config(**changes) -> TrainConfig:
    """S3 at length 8 with a one-layer M2RNN (h=16, 4 heads of K=4, V=4), batch 8, 4 steps."""
    config = TrainConfig(
        model=state_tracking_model(
            "s3", hidden_size=16, num_layers=1, num_heads=4, k_head_dim=4, v_head_dim=4, intermediate_size=16
        ),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
        data=DataConfig(kind="state_tracking", group="s3", seq_len=8, eval_lengths=(8,), eval_batch_size=8),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=2, keep=2),
        steps=4,
        batch_size=8,
        log_every=1,
    )
    return config.__class__(**{**config.__dict__, **changes})
