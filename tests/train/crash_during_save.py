"""Saves step 2 of a tiny run, starts an async save of step 4 and dies at once (run by test_checkpoint.py)."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.train.checkpoint import Checkpointer
from m2rnn_jax.train.optimizer import build_optimizer
from m2rnn_jax.train.state import create_train_state
from tests.train.tiny import tiny_train_config

if __name__ == "__main__":
    config = tiny_train_config()
    optimizer = build_optimizer(config.optimizer, config.steps)
    state, _ = create_train_state(config.model, optimizer, config.seed, build_mesh({"data": 1}))
    checkpointer = Checkpointer(sys.argv[1], keep=3, async_save=True)
    checkpointer.save(state._replace(step=jnp.asarray(2, jnp.int32)), {"data_position": {"next_step": 2}})
    checkpointer.wait_until_finished()
    bigger = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    checkpointer.save(bigger._replace(step=jnp.asarray(4, jnp.int32)), {"data_position": {"next_step": 4}})
    print("save of step 4 started", flush=True)
    os._exit(1)  # die while the async save may still be writing
