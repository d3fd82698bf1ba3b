"""Every seed of one (group, model) of the comparison trained as ONE program (``compare --stack-seeds``).

On a GPU the comparison's models (2 layers, width 128, batch 128) are launch-bound: a step of three seeds stacked
on a leading axis costs about the launches of one. Each seed's train state is built as the
:class:`~m2rnn_jax.train.trainer.Trainer` builds it (:func:`~m2rnn_jax.train.state.create_train_state` with the
seed); the states are stacked on a leading seed axis (``n`` = number of seeds: every leaf ``(n, ...)``, the step
too) and ``jax.jit(jax.vmap(train_step))`` of :func:`~m2rnn_jax.train.step.make_train_step` trains them on one
device. Every seed gets what its Trainer would give it: its own data stream (its config's batch source, rows
``0 .. batch_size``), the curriculum's length at each step, its own RNG and optimizer state.

Files: each seed's run directory gets ``config.json``, ``metrics.jsonl`` (the Trainer's "train" records; the
throughput in them is the stacked program's, every seed's tokens counted) and ``result.json`` as ``run_one`` writes
it plus ``"stacked_seeds"`` (``train_seconds``: the stacked training, shared; ``seconds``: that plus this seed's
evaluation). A run stopped before its last step (``should_stop``: the deadline, SIGTERM) saves the stacked state
(Orbax, written under a temporary name and renamed when complete) in ``<out>/runs/<group>/<model>/stack``; the next
call with the same seeds and configuration resumes from it (bit-identical: every batch is a function of the step).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.state_tracking.positions import position_curves
from experiments.state_tracking.recipes import Recipe, train_config
from experiments.state_tracking.run_files import cached_result, prepare_run_directory, run_directory, write_result
from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.data.sources import make_source
from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.parallel.shardings import replicated
from m2rnn_jax.train.checkpoint import Checkpointer
from m2rnn_jax.train.config import TrainConfig
from m2rnn_jax.train.flops import peak_flops_per_device, training_flops_per_token
from m2rnn_jax.train.metrics import MetricsLogger
from m2rnn_jax.train.optimizer import build_optimizer, learning_rate_schedule
from m2rnn_jax.train.progress import Console
from m2rnn_jax.train.state import TrainState, abstract_train_state, create_train_state, model_graphdef
from m2rnn_jax.train.step import make_train_step
from m2rnn_jax.train.trainer import Throughput


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list; ValueError if it is empty or repeats a seed."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected at least one seed, each once, got {seeds}")
    return seeds


def _without_seed(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, seed=0, data=dataclasses.replace(config.data, seed=0))


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure -> one pytree whose leaves carry a leading axis, entry i from ``trees[i]``."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, index: int) -> Any:
    """Entry ``index`` of the leading axis of every leaf of ``tree``."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


class StackedTraining:
    """The runs of ``configs`` (equal but for their seeds) trained together on one device.

    ``run_directories[i]`` gets the metrics of ``configs[i]``; ``stack_directory`` holds the stacked checkpoint and
    ``stack.json`` (its seeds and configs: a checkpoint of other runs is deleted, not resumed).
    """

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        run_directories: Sequence[Path],
        stack_directory: Path,
        console: Console | None = None,
    ):
        self.configs = list(configs)
        self.seeds = check_seeds([config.seed for config in self.configs])
        self.run_directories = [Path(directory) for directory in run_directories]
        if len(self.run_directories) != len(self.configs):
            raise ValueError(f"run_directories: expected {len(self.configs)}, got {len(self.run_directories)}")
        config = self.config = self.configs[0]
        if any(_without_seed(other) != _without_seed(config) for other in self.configs):
            raise ValueError("configs: expected configurations that differ only in their seed")
        self.console = Console() if console is None else console
        self.mesh = build_mesh(config.mesh.axis_sizes, jax.devices()[:1])
        self.schedule = learning_rate_schedule(config.optimizer, config.steps)
        self.optimizer = build_optimizer(config.optimizer, config.steps)
        self.graphdef = model_graphdef(config.model)
        self.sources = [make_source(c.data, c.model.vocab_size) for c in self.configs]
        step = make_train_step(self.graphdef, self.optimizer, self.schedule, config.grad_accum_steps)
        self._train_step = jax.jit(jax.vmap(step), donate_argnums=0)
        self.stack_directory = Path(stack_directory)
        self._check_stack_directory()
        self.checkpointer = Checkpointer(self.stack_directory / "checkpoints", keep=1, async_save=False)
        self.state = self._initial_state()
        self.loggers = [MetricsLogger(directory, console=Console(enabled=False)) for directory in self.run_directories]

    def _identity(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "configs": [config.to_dict() for config in self.configs]}

    def _check_stack_directory(self) -> None:
        """Deletes a stack directory of other runs; writes ``stack.json`` for these."""
        path = self.stack_directory / "stack.json"
        if path.is_file() and json.loads(path.read_text()) != self._identity():
            shutil.rmtree(self.stack_directory)
        self.stack_directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as temporary:
            temporary.write_text(json.dumps(self._identity()) + "\n")

    def _saved_abstract(self) -> TrainState:
        """The checkpoint's layout: every leaf stacked, the step once (a scalar: every seed is at the same step)."""
        single = abstract_train_state(self.config.model, self.optimizer)
        sharding = replicated(self.mesh)
        stacked = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct((len(self.seeds), *leaf.shape), leaf.dtype, sharding=sharding), single
        )
        return stacked._replace(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding))

    def _initial_state(self) -> TrainState:
        latest = self.checkpointer.latest_step()
        if latest is None:
            for config, directory in zip(self.configs, self.run_directories):
                directory.mkdir(parents=True, exist_ok=True)
                with atomic_file(directory / "config.json") as temporary:
                    temporary.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            with self.console.timed_phase(f"initialising the parameters of seeds {self.seeds}", "initialised"):
                states = [create_train_state(c.model, self.optimizer, c.seed, self.mesh)[0] for c in self.configs]
            return stack(states)
        with self.console.timed_phase(f"restoring the stacked checkpoint at step {latest}", "restored"):
            saved, _ = self.checkpointer.restore(self._saved_abstract(), latest)
        return saved._replace(step=jnp.full((len(self.seeds),), saved.step, jnp.int32))

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step[0]))

    def save(self) -> None:
        """Checkpoints the stacked state at its step (waits until written)."""
        step = self.step
        metadata = {"step": step, "data_position": {"next_step": step, "kind": self.config.data.kind}}
        self.checkpointer.save(self.state._replace(step=self.state.step[0]), {**metadata, **self._identity()})
        self.checkpointer.wait_until_finished()
        self.console.phase(f"checkpoint: stacked step {step} written to {self.checkpointer.directory}")

    def _batch(self, step: int) -> dict[str, jax.Array]:
        """Training batch ``step`` of every seed, stacked: (n, batch_size, seq_len) arrays."""
        config = self.config
        seq_len = config.data.seq_len_at(step)
        rows = slice(0, config.batch_size)
        batches = [source.train_batch(step, seq_len, config.batch_size, rows) for source in self.sources]
        return {name: jnp.asarray(np.stack([batch[name] for batch in batches])) for name in batches[0]}

    def _log(self, step: int, metrics: dict[str, jax.Array], seq_len: int, throughput: Throughput) -> None:
        """One "train" record per seed's metrics.jsonl, one summary line on the console (the throughput is read
        once the step's metrics are on the host: the steps queued before it are counted finished)."""
        metrics = jax.device_get(metrics)
        rates = throughput.values()
        for index, logger in enumerate(self.loggers):
            values = {name: float(value[index]) for name, value in metrics.items()}
            logger.write("train", step, {**values, **rates, "seq_len": seq_len})
        losses = " ".join(f"{value:.4g}" for value in metrics["loss"])
        accuracies = " ".join(f"{value:.4g}" for value in metrics["accuracy"])
        rate = f", {rates['steps_per_second']:.3g} steps/s" if rates else ""
        self.console.line(
            f"train step {step}/{self.config.steps} (length {seq_len}, seeds {self.seeds}): loss {losses}, "
            f"accuracy {accuracies}{rate}"
        )

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Trains every seed to ``steps``; ``should_stop()`` is asked after each step and True saves the state and
        returns. Returns the step reached."""
        config, count = self.config, len(self.seeds)
        throughput = Throughput(training_flops_per_token(config.model, config.data.seq_len), peak_flops_per_device())
        compiled: set[int] = set()
        with jax.set_mesh(self.mesh):
            for step in range(self.step, config.steps):
                batch = self._batch(step)
                seq_len = int(batch["inputs"].shape[-1])
                if seq_len in compiled:
                    self.state, metrics = self._train_step(self.state, batch)
                    throughput.add(count * config.batch_size * seq_len)
                else:
                    compiled.add(seq_len)
                    what = f"compiling the stacked train step for length {seq_len} ({count} seeds x batch "
                    with self.console.timed_phase(what + f"{config.batch_size})", "compiled and ran the first step"):
                        self.state, metrics = self._train_step(self.state, batch)
                        jax.block_until_ready(metrics)
                    throughput.reset()
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    self._log(done, metrics, seq_len, throughput)
                    throughput.reset()
                if done < config.steps and should_stop():
                    self.save()
                    break
        return self.step

    def params(self, index: int) -> Any:
        """The parameters of ``seeds[index]``."""
        return unstack(self.state.params, index)

    def close(self) -> None:
        self.checkpointer.close()
        for logger in self.loggers:
            logger.close()


def run_stacked(
    recipe: Recipe,
    model: str,
    group: str,
    seeds: Sequence[int],
    out: Path,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[dict[str, Any]]:
    """``run_one`` for every seed of ``seeds`` at once: the finished ones are read back, the others trained (or
    resumed) together, evaluated one by one and written. Returns the ``result.json`` of every seed, in order."""
    results = {seed: _cached(recipe, model, group, seed, out) for seed in check_seeds(seeds)}
    pending = [train_config(recipe, model, group, seed) for seed, result in results.items() if result is None]
    if pending:
        directories = [run_directory(out, group, model, config.seed) for config in pending]
        for config, directory in zip(pending, directories):
            prepare_run_directory(directory, config)
        started = time.perf_counter()
        training = StackedTraining(pending, directories, out / "runs" / group / model / "stack")
        training.run(should_stop)
        training.close()
        results.update(write_results(training, recipe, model, group, time.perf_counter() - started))
    return list(results.values())


def pending_seeds(recipe: Recipe, model: str, group: str, seeds: Sequence[int], out: Path) -> list[int]:
    """The seeds of ``seeds`` without a finished result of this configuration under ``out`` (those
    :func:`run_stacked` trains)."""
    return [seed for seed in check_seeds(seeds) if _cached(recipe, model, group, seed, out) is None]


def _cached(recipe: Recipe, model: str, group: str, seed: int, out: Path) -> dict[str, Any] | None:
    return cached_result(run_directory(out, group, model, seed), train_config(recipe, model, group, seed))


def write_results(
    training: StackedTraining, recipe: Recipe, model: str, group: str, train_seconds: float
) -> dict[int, dict[str, Any]]:
    """Evaluates every seed of a trained :class:`StackedTraining` at every position and writes its
    ``result.json`` (``run_one``'s fields plus ``stacked_seeds``); a complete training's stack directory is removed.
    Returns {seed: result}."""
    results = {}
    for index, config in enumerate(training.configs):
        evaluated = time.perf_counter()
        curves = position_curves(
            training.graphdef, training.params(index), training.mesh, group, max(recipe.lengths), recipe.eval_sequences
        )
        results[config.seed] = write_result(
            training.run_directories[index],
            recipe,
            model,
            group,
            config,
            steps_done=training.step,
            train_seconds=train_seconds,
            seconds=train_seconds + time.perf_counter() - evaluated,
            curves=curves,
            stacked_seeds=training.seeds,
        )
    if training.step >= training.config.steps:
        shutil.rmtree(training.stack_directory)
    return results
