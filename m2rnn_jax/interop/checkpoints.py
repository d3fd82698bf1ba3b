"""lm-engine checkpoints (safetensors + ``config.json``) <-> m2rnn-jax run directories (Orbax + ``config.json``).

* :func:`import_lm_engine` reads an lm-engine directory tensor by tensor into the parameters of a train state at
  step 0 and writes ``<workdir>/config.json`` and ``<workdir>/checkpoints/0``, a *parameters-only* checkpoint (no
  optimizer state): ``m2rnn-jax train`` resumes from it and builds fresh optimizer moments then
  (:meth:`m2rnn_jax.train.checkpoint.Checkpointer.restore`), ``eval`` and ``generate`` load it.
* :func:`export_lm_engine` restores only a run's parameters (the optimizer moments stay on disk) and writes
  ``<output>/model.safetensors`` one tensor at a time plus ``<output>/config.json`` in lm-engine's ``gpt_base``
  format.

Memory: either direction holds the parameters once plus one tensor in conversion (no optimizer state, no second
copy of the model).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.interop.lm_engine_config import from_lm_engine_config, to_lm_engine_config
from m2rnn_jax.interop.names import lm_engine_tensors, name_map, params_from_tensors
from m2rnn_jax.interop.safetensors_io import SINGLE_FILE, SafetensorsReader, write_safetensors
from m2rnn_jax.models import ModelConfig
from m2rnn_jax.train.config import TrainConfig

__all__ = ["import_lm_engine", "export_lm_engine", "read_lm_engine_config"]

CONFIG_FILE = "config.json"
# Orbax moves at most this many GB of arrays at once while saving or restoring a converted model (its default,
# 96 GB, lets it stage a second host copy of the whole model).
CONCURRENT_GB = 1


def read_lm_engine_config(source: str | Path, **overrides: Any) -> ModelConfig:
    """Our ModelConfig for the lm-engine ``config.json`` in directory ``source`` (see ``from_lm_engine_config``)."""
    path = Path(source) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"source: expected an lm-engine checkpoint directory holding {CONFIG_FILE}, got {str(source)!r}"
        )
    return from_lm_engine_config(json.loads(path.read_text()), **overrides)


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def import_lm_engine(
    source: str | Path, workdir: str | Path, make_config: Callable[[ModelConfig], TrainConfig]
) -> TrainConfig:
    """Convert the lm-engine checkpoint in ``source`` into the run directory ``workdir`` (must hold no checkpoint).

    ``make_config(model_config)`` returns the run's TrainConfig (training settings around the converted model; its
    model must have the same structure). Returns that config.
    """
    from m2rnn_jax.train.checkpoint import Checkpointer
    from m2rnn_jax.train.optimizer import build_optimizer
    from m2rnn_jax.train.state import TrainState, abstract_train_state

    model_config = read_lm_engine_config(source)
    config = make_config(model_config)
    if to_lm_engine_config(config.model) != to_lm_engine_config(model_config):
        raise ValueError(
            "--set / --preset: the run's model must keep the structure of the lm-engine checkpoint; "
            f"got {config.model} for {model_config}"
        )
    workdir = Path(workdir)
    checkpoint_dir = workdir / "checkpoints"
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        raise ValueError(f"--workdir: {str(checkpoint_dir)!r} already holds checkpoints; use a new directory")
    reader = SafetensorsReader(source)
    # ShapeDtypeStructs only (nothing allocated); the parameters' nnx.State is filled in place.
    params = abstract_train_state(config.model, build_optimizer(config.optimizer, config.steps)).params
    read = functools.partial(reader.read, copy=False)  # views of the file: each tensor is copied once, aligned
    nnx.replace_by_pure_dict(params, params_from_tensors(params, read, reader.names(), place=jax.device_put))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=None,
        rng=jax.random.key_data(jax.random.key(config.seed + 1)),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(workdir / CONFIG_FILE, config.to_dict())
    checkpointer = Checkpointer(
        checkpoint_dir, keep=config.checkpoint.keep, async_save=False, concurrent_gb=CONCURRENT_GB
    )
    try:
        metadata = {
            "step": 0,
            "data_position": {"next_step": 0, "kind": config.data.kind},
            "config": config.to_dict(),
            "converted_from": str(Path(source).absolute()),
        }
        checkpointer.save(state, metadata, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    return config


def export_lm_engine(
    workdir: str | Path, output: str | Path, step: int | None = None, **token_ids: int
) -> dict[str, Any]:
    """Write the parameters of run ``workdir`` (checkpoint ``step``, default latest) as an lm-engine checkpoint.

    ``token_ids`` (bos_token_id, eos_token_id, pad_token_id) go into the lm-engine config as metadata. Returns
    ``{"step", "num_tensors", "num_parameters"}``.
    """
    from m2rnn_jax.train.restore import restore_params

    workdir = Path(workdir)
    saved = workdir / CONFIG_FILE
    if not saved.is_file():
        raise ValueError(f"--checkpoint: expected a run directory holding {CONFIG_FILE}, got {str(workdir)!r}")
    config = TrainConfig.from_dict(json.loads(saved.read_text()))
    lm_config = to_lm_engine_config(config.model, **token_ids)
    restored = restore_params(config, workdir / "checkpoints", step, concurrent_gb=CONCURRENT_GB)
    leaves = {name: array for name, array in _leaves_by_name(restored.params)}
    mapping = name_map(restored.params)
    specs = {entry.name: (entry.lm_engine_shape, np.dtype(leaves[entry.name].dtype)) for entry in mapping.values()}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tensors = _lazy_tensors(restored.params)
    write_safetensors(output / SINGLE_FILE, specs, tensors, metadata={"format": "pt"})
    _write_json(output / CONFIG_FILE, lm_config)
    return {
        "step": restored.step,
        "num_tensors": len(specs),
        "num_parameters": int(sum(np.prod(shape, dtype=np.int64) for shape, _ in specs.values())),
    }


def _leaves_by_name(params: Any) -> list[tuple[str, jax.Array]]:
    """(lm-engine name, the Flax leaf, not converted) for every parameter."""
    mapping = name_map(params)
    leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    return [(entry.name, leaf) for entry, leaf in zip(mapping.values(), leaves)]


def _lazy_tensors(params: Any) -> Callable[[str], np.ndarray]:
    """name -> the tensor in lm-engine layout, converted when asked (in the order of ``name_map``)."""
    stream = lm_engine_tensors(params)

    def produce(name: str) -> np.ndarray:
        produced, array = next(stream)
        if produced != name:
            raise ValueError(f"produce: expected tensor {name!r}, the stream is at {produced!r}")
        return array

    return produce
