"""Checkpoints with Orbax ``CheckpointManager``: the train state plus JSON metadata (data position, config).

Saves are asynchronous by default (training continues while the arrays are written). Orbax writes each step into
a temporary directory and renames it only once complete, so a save that is interrupted (crash, kill) leaves the
previous checkpoint as the latest one. Restoring takes the target shardings, so a checkpoint written on one mesh
loads onto any other mesh shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from m2rnn_jax.train.state import TrainState


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (None if there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, metadata: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` at its step (returns at once when async); ``metadata`` must be JSON-ready."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
            force=force,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """(state, metadata) of ``step`` (default: the latest), placed with the shardings of ``abstract_state``
        (a TrainState of ``jax.ShapeDtypeStruct`` with ``sharding`` set)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"checkpoint: no complete checkpoint in {str(self.directory)!r}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.metadata)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs of ``abstract_state`` carrying the NamedShardings of ``shardings``."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
