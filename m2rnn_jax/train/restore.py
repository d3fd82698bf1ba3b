"""A run directory: loading its parameters onto any mesh, and checking that a resume continues the same run."""

from __future__ import annotations

import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

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


def restore_params(
    config: TrainConfig,
    checkpoint_dir: str | Path,
    step: int | None = None,
    *,
    flag: str = "--workdir",
    concurrent_gb: int | None = None,
) -> RestoredParams:
    """The parameters of checkpoint ``step`` (default: latest) placed on the mesh of ``config.mesh`` (the optimizer
    state stays on disk: only the parameters are read). ``flag`` names the run directory in the error when there is
    no checkpoint; ``concurrent_gb`` limits the arrays Orbax reads at once (see :class:`Checkpointer`)."""
    mesh = build_mesh(config.mesh.axis_sizes)
    optimizer = build_optimizer(config.optimizer, config.steps)
    abstract = abstract_train_state(config.model, optimizer)
    shardings = train_state_shardings(abstract, optimizer, mesh)
    checkpointer = Checkpointer(
        checkpoint_dir, keep=config.checkpoint.keep, async_save=False, concurrent_gb=concurrent_gb
    )
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ValueError(
                f"{flag}: expected a run directory with a checkpoint, got none under {str(Path(checkpoint_dir))!r}"
            )
        if step not in checkpointer.all_steps():
            raise ValueError(f"--step: expected one of {checkpointer.all_steps()}, got {step}")
        state, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings), step, params_only=True)
    finally:
        checkpointer.close()
    return RestoredParams(state.params, shardings.params, model_graphdef(config.model), mesh, step)


# Fields of a run's config.json that may differ when training resumes in the same workdir (fnmatch patterns over
# dotted keys). They change how long, how often and where it runs, not what is trained: the length (steps; the
# learning-rate schedule is recomputed for the new total), logging / evaluation / checkpoint / sampling cadence,
# the evaluation sets, the mesh (checkpoints load onto any mesh) and how mixers compute (backends, remat).
RESUME_CHANGEABLE: tuple[str, ...] = (
    "steps",
    "eval_every",
    "log_every",
    "checkpoint.*",
    "sample.*",
    "mesh.*",
    "data.eval_lengths",
    "data.eval_batch_size",
    "data.eval_batches",
    "data.eval_windows",
    "model.remat",
    "model.*.backend",
    "model.attention.implementation",
)


class ConfigChange(NamedTuple):
    """One field that differs between a run's stored config and the requested one (``key`` dotted)."""

    key: str
    stored: Any
    requested: Any

    @property
    def changeable(self) -> bool:
        """True if the field may change on resume (:data:`RESUME_CHANGEABLE`)."""
        return any(fnmatch.fnmatchcase(self.key, pattern) for pattern in RESUME_CHANGEABLE)

    def describe(self) -> str:
        return f"{self.key} (stored {_short(self.stored)}, requested {_short(self.requested)})"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_changes(stored: dict[str, Any], requested: dict[str, Any], prefix: str = "") -> list[ConfigChange]:
    """Every field where two config dicts (``TrainConfig.to_dict()``) differ, as dotted keys in order; a
    sub-config present on one side only (e.g. a mixer) is one change holding the whole sub-dict."""
    changes = []
    for key in list(stored) + [key for key in requested if key not in stored]:
        old, new = stored.get(key), requested.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(ConfigChange(f"{prefix}{key}", old, new))
    return changes


def read_run_config(workdir: str | Path, flag: str, hint: str = "") -> dict[str, Any] | None:
    """The run's config.json as ``TrainConfig.to_dict()`` (defaults filled in), None without one; ``ValueError``
    naming ``flag`` (and adding ``hint``) when it cannot be read."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())).to_dict()
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        raise ValueError(
            f"{flag} {str(workdir)}: expected a readable config.json, got {str(path)!r} ({err}){hint}"
        ) from err


def check_workdir_config(workdir: str | Path, config: TrainConfig) -> list[ConfigChange]:
    """The changes from the run stored in ``workdir`` (its config.json) to ``config``, all of them in
    :data:`RESUME_CHANGEABLE`; none for a workdir without config.json.

    Raises:
        ValueError: the workdir holds a different run (a field outside :data:`RESUME_CHANGEABLE` differs); the
            message names every differing field and the ways out.
    """
    stored = read_run_config(workdir, "--workdir", "; pass --restart to move this run aside and start over")
    if stored is None:
        return []
    changes = config_changes(stored, config.to_dict())
    fixed = [change for change in changes if not change.changeable]
    if fixed:
        raise ValueError(
            f"--workdir {str(workdir)}: holds a different run; differing fields: "
            f"{', '.join(change.describe() for change in fixed)}\n"
            f"  ways out: train into another --workdir; or add --restart to move this run aside (renamed to "
            f"{Path(workdir).name}.replaced-<time>, nothing deleted) and start over; or resume it as stored "
            f"(m2rnn-jax train --workdir {str(workdir)} without --preset/--config). Fields that may change on "
            f"resume: {', '.join(RESUME_CHANGEABLE)}"
        )
    return changes


def check_same_model(workdir: str | Path, config: TrainConfig, flag: str) -> None:
    """For eval / generate given another config than the run's: ``ValueError`` naming ``flag`` and every differing
    field when ``config.model`` is not the model stored in ``workdir`` (its checkpoint would not load); fields in
    :data:`RESUME_CHANGEABLE` (remat, backends) may differ. Nothing to check without config.json."""
    stored = read_run_config(workdir, flag)
    if stored is None:
        return
    fixed = [
        change
        for change in config_changes(stored["model"], config.to_dict()["model"], "model.")
        if not change.changeable
    ]
    if fixed:
        raise ValueError(
            f"{flag} {str(workdir)}: holds a different model; differing fields: "
            f"{', '.join(change.describe() for change in fixed)} (without --preset/--config the "
            f"run's own config.json is used)"
        )


def move_run_aside(workdir: str | Path) -> Path | None:
    """Renames an existing ``workdir`` to the sibling ``<name>.replaced-<UTC time>`` (one atomic rename: the old
    run stays complete and readable there); returns the new path, or None when ``workdir`` does not exist."""
    workdir = Path(workdir)
    if not workdir.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = workdir.with_name(f"{workdir.name}.replaced-{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = workdir.with_name(f"{workdir.name}.replaced-{stamp}-{number}")
    os.rename(workdir, target)
    return target
