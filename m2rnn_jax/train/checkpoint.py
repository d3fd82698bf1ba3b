"""Checkpoints with Orbax ``CheckpointManager``: the train state plus JSON metadata (data position, config).

Saves are asynchronous by default (training continues while the arrays are written). Orbax writes each step into
a temporary directory and renames it only once complete, so a save that is interrupted (crash, kill) leaves the
previous checkpoint as the latest one. Restoring takes the target shardings, so a checkpoint written on one mesh
loads onto any other mesh shape.

A state whose ``opt_state`` is None is saved as a *parameters-only* checkpoint (``"params_only": true`` in its
metadata; ``m2rnn-jax convert --from-lm-engine`` writes one, so that converting never holds the optimizer moments).
Restoring one with an ``optimizer`` builds a fresh optimizer state from the restored parameters, in its shards;
``params_only=True`` restores just step, parameters and RNG of any checkpoint (the optimizer state is not read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from m2rnn_jax.train.state import TrainState


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``directory``."""

    def __init__(
        self, directory: str | Path, *, keep: int = 3, async_save: bool = True, concurrent_gb: int | None = None
    ):
        """``concurrent_gb``: at most this many GB of arrays in flight while saving or restoring (Orbax's default,
        96, may stage a host copy of a whole model at once; a small value keeps host memory near one model)."""
        self.directory = Path(directory).absolute()
        self._concurrent_gb = concurrent_gb
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        handlers = None
        if concurrent_gb is not None:
            handlers = {
                "state": ocp.StandardCheckpointHandler(
                    save_concurrent_gb=concurrent_gb, restore_concurrent_gb=concurrent_gb
                ),
                "metadata": ocp.JsonCheckpointHandler(),
            }
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (None if there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, metadata: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` at its step (returns at once when async); ``metadata`` must be JSON-ready.
        A state without optimizer state (``opt_state`` None) is marked ``params_only`` in the metadata."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        if state.opt_state is None:
            metadata = {**metadata, "params_only": True}
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
            force=force,
        )

    def restore(
        self,
        abstract_state: TrainState,
        step: int | None = None,
        *,
        optimizer: optax.GradientTransformation | None = None,
        params_only: bool = False,
    ) -> tuple[TrainState, dict[str, Any]]:
        """(state, metadata) of ``step`` (default: the latest), placed with the shardings of ``abstract_state``
        (a TrainState of ``jax.ShapeDtypeStruct`` with ``sharding`` set).

        ``params_only``: leave the optimizer state on disk (the returned ``opt_state`` is None). Otherwise a
        parameters-only checkpoint needs ``optimizer``, whose ``init`` builds the optimizer state from the restored
        parameters with the shardings of ``abstract_state.opt_state``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"checkpoint: no complete checkpoint in {str(self.directory)!r}")
        metadata = dict(self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata)
        saved_params_only = bool(metadata.get("params_only", False))
        if saved_params_only and not params_only and optimizer is None:
            raise ValueError(
                f"checkpoint: step {step} in {str(self.directory)!r} holds parameters only; pass the "
                "optimizer to build its state"
            )
        if params_only and not saved_params_only:
            state = self._restore_without_opt_state(abstract_state, step)
        else:
            target = abstract_state._replace(opt_state=None) if saved_params_only else abstract_state
            state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        if saved_params_only and not params_only:
            shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state.opt_state)
            state = state._replace(opt_state=jax.jit(optimizer.init, out_shardings=shardings)(state.params))
        return state, metadata

    def _restore_without_opt_state(self, abstract_state: TrainState, step: int) -> TrainState:
        """Step, parameters and RNG of a full checkpoint; the optimizer state's arrays are skipped
        (``ocp.PLACEHOLDER`` leaves), not read."""
        target = abstract_state._replace(opt_state=jax.tree.map(lambda _: ocp.PLACEHOLDER, abstract_state.opt_state))
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=self._concurrent_gb)
        with ocp.Checkpointer(handler) as reader:  # its own handler: this manager's "state" item is a StandardSave
            state = reader.restore(
                self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
            )
        return state._replace(opt_state=None)

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
