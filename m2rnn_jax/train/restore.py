"""Loading a run's parameters for evaluation or inference, onto any mesh."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from flax import nnx
from jax.sharding import Mesh

from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from m2rnn_jax.train.config import TrainConfig
from m2rnn_jax.train.optimizer import build_optimizer
from m2rnn_jax.train.state import abstract_train_state, model_graphdef, train_state_shardings


class RestoredParams(NamedTuple):
    params: nnx.State
    param_shardings: nnx.State
    graphdef: nnx.GraphDef
    mesh: Mesh
    step: int


def restore_params(config: TrainConfig, checkpoint_dir: str | Path, step: int | None = None) -> RestoredParams:
    """The parameters of checkpoint ``step`` (default: latest) placed on the mesh of ``config.mesh``."""
    mesh = build_mesh(config.mesh.axis_sizes)
    optimizer = build_optimizer(config.optimizer, config.steps)
    abstract = abstract_train_state(config.model, optimizer)
    shardings = train_state_shardings(abstract, optimizer, mesh)
    checkpointer = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"--workdir: no checkpoint under {str(Path(checkpoint_dir))!r}")
        if step not in checkpointer.all_steps():
            raise ValueError(f"--step: expected one of {checkpointer.all_steps()}, got {step}")
        state, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings), step)
    finally:
        checkpointer.close()
    return RestoredParams(state.params, shardings.params, model_graphdef(config.model), mesh, step)
