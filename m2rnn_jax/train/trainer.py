"""The training loop: sharded jitted steps, checkpoints (resume, SIGTERM), metrics, evaluation, final report."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from m2rnn_jax.data.sources import make_source
from m2rnn_jax.data.token_file import copy_tokenizer, is_prepared, read_prepared
from m2rnn_jax.parallel.batches import global_batch
from m2rnn_jax.parallel.mesh import build_mesh, without_context
from m2rnn_jax.parallel.shardings import batch_sharding, batch_shards, replicated
from m2rnn_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from m2rnn_jax.train.compile_cache import describe_compile_cache
from m2rnn_jax.train.config import TrainConfig
from m2rnn_jax.train.evaluation import Evaluator, format_table, write_report
from m2rnn_jax.train.flops import peak_flops_per_device, training_flops_per_token
from m2rnn_jax.train.metrics import MetricsLogger
from m2rnn_jax.train.optimizer import build_optimizer, learning_rate_schedule
from m2rnn_jax.train.progress import Console
from m2rnn_jax.train.restore import check_workdir_config
from m2rnn_jax.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    model_graphdef,
    train_state_shardings,
)
from m2rnn_jax.train.step import make_train_step


class _StopSignal:
    """Remembers a SIGTERM (or SIGINT) so that the loop can save and exit at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self) -> bool:
        """True if any process got the signal (all processes must stop at the same step)."""
        flag = np.asarray(self.received is not None, dtype=np.int32)
        if jax.process_count() > 1:
            flag = multihost_utils.process_allgather(flag).max()
        return bool(flag)


class Throughput:
    """Tokens and steps since the last :meth:`reset` (called after compiles and evaluations, which are not
    throughput) as tokens/s, steps/s and, when the chip's peak is known, MFU."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.steps = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def values(self) -> dict[str, float]:
        """{} when no step was timed."""
        if not self.steps:
            return {}
        elapsed = time.perf_counter() - self.start
        values = {"tokens_per_second": self.tokens / elapsed, "steps_per_second": self.steps / elapsed}
        if self.peak_flops is not None:
            values["mfu"] = values["tokens_per_second"] * self.flops_per_token / (self.peak_flops * jax.device_count())
        return values


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`run` trains (resuming if possible).

    Files under ``workdir``: ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, for
    state-tracking data ``length_generalization.{json,png}``, for a prepared text directory its tokenizer.

    A ``workdir`` holding another run (its config.json differs outside
    :data:`~m2rnn_jax.train.restore.RESUME_CHANGEABLE`) is a ``ValueError`` before anything is built. ``name`` (the
    preset or config file) titles the start-up header printed on ``console`` (default: stdout of the main process),
    which also gets a line per phase (compile, curriculum length, evaluation, checkpoint) and the progress.
    """

    def __init__(
        self, config: TrainConfig, workdir: str | Path, *, name: str | None = None, console: Console | None = None
    ):
        self.config, self.workdir = config, Path(workdir)
        self.is_main = jax.process_index() == 0
        self.console = Console(enabled=self.is_main) if console is None else console
        self.resume_changes = check_workdir_config(self.workdir, config)
        self.mesh = build_mesh(config.mesh.axis_sizes)
        self._check_divisibility()
        self.schedule = learning_rate_schedule(config.optimizer, config.steps)
        self.optimizer = build_optimizer(config.optimizer, config.steps)
        self.graphdef = model_graphdef(config.model)
        self.source = make_source(config.data, config.model.vocab_size)
        self.batch_sharding = batch_sharding(self.mesh)
        self.logger = MetricsLogger(self.workdir, enabled=self.is_main, console=self.console)
        if self.is_main and is_prepared(config.data.path):  # eval / generate find the tokenizer in the workdir
            copy_tokenizer(read_prepared(config.data.path), self.workdir)
        self.checkpointer = Checkpointer(
            self.workdir / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
        )
        latest = self.checkpointer.latest_step()
        abstract = abstract_train_state(config.model, self.optimizer)
        self._print_header(name, abstract, latest)
        self.state, self.state_shardings = self._initial_state(abstract, latest)
        self._train_step = jax.jit(
            make_train_step(self.graphdef, self.optimizer, self.schedule, config.grad_accum_steps),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated(self.mesh)),
            donate_argnums=0,
        )
        self.evaluator = Evaluator(self.graphdef, self.state_shardings.params, self.mesh, self.source, config.data)

    def _check_divisibility(self) -> None:
        shards = batch_shards(self.mesh)
        micro = self.config.micro_batch_size
        if micro % shards != 0:
            raise ValueError(
                f"batch_size: the micro-batch (batch_size / grad_accum_steps = {micro}) must be a multiple of the "
                f"{shards} batch shards of the mesh (data * fsdp * expert)"
            )
        tensor = self.mesh.shape["tensor"]
        m2rnn = self.config.model.m2rnn
        if m2rnn is not None and m2rnn.num_heads % tensor != 0:
            raise ValueError(
                f"model.m2rnn.num_heads: expected a multiple of mesh.tensor={tensor} (heads are split over the "
                f"tensor axis), got {m2rnn.num_heads}"
            )

    def _print_header(self, name: str | None, abstract: TrainState, latest: int | None) -> None:
        """What is trained, where and how: printed before anything compiles."""
        config, model, data = self.config, self.config.model, self.config.data
        parameters = sum(leaf.size for leaf in jax.tree.leaves(abstract.params))
        device = jax.devices()[0]
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh.shape.items())
        source = {"state_tracking": f"state tracking, group {data.group}", "token_file": f"token file {data.path}"}
        lengths = " -> ".join(str(length) for _, length in data.curriculum) or str(data.seq_len)
        accumulation = f" in {config.grad_accum_steps} micro-batches" if config.grad_accum_steps > 1 else ""
        resumed = "new run" if latest is None else f"resuming from step {latest}"
        if self.resume_changes:
            resumed += "; changed: " + ", ".join(change.describe() for change in self.resume_changes)
        self.console.header(
            f"m2rnn-jax train: {name or 'config'}",
            [
                (
                    "model",
                    f"{model.layer_pattern} ({model.num_layers} layers, hidden {model.hidden_size}, vocab "
                    f"{model.vocab_size}), {parameters:,} parameters",
                ),
                (
                    "devices",
                    f"{jax.device_count()} x {device.platform} ({device.device_kind}), "
                    f"{jax.process_count()} process(es); mesh {mesh}",
                ),
                ("dtypes", f"compute {model.dtype}, parameters {model.param_dtype}, remat {model.remat}"),
                (
                    "data",
                    f"{source.get(data.kind, data.kind)}; length {lengths}; batch {config.batch_size}{accumulation}",
                ),
                (
                    "steps",
                    f"{config.steps} (log every {config.log_every}, evaluate every {config.eval_every or '-'} "
                    f"and at the end, checkpoint every {config.checkpoint.every_steps})",
                ),
                ("workdir", f"{self.workdir} ({resumed})"),
                ("compiles", describe_compile_cache()),
            ],
        )

    def _write_config(self) -> None:
        """config.json of the run (atomically; main process only)."""
        from m2rnn_jax.data.atomic import atomic_file

        if self.is_main:
            with atomic_file(self.workdir / "config.json") as temporary:
                temporary.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _initial_state(self, abstract: TrainState, latest: int | None) -> tuple[TrainState, TrainState]:
        if latest is None:
            with self.console.timed_phase("initialising the parameters", "initialised"):
                state, shardings = create_train_state(self.config.model, self.optimizer, self.config.seed, self.mesh)
            self._write_config()
            return state, shardings
        if self.resume_changes:
            self._write_config()
        shardings = train_state_shardings(abstract, self.optimizer, self.mesh)
        with self.console.timed_phase(
            f"restoring the checkpoint in {self.checkpointer.directory}", f"resumed from step {latest}"
        ):
            state, metadata = self.checkpointer.restore(
                abstract_with_shardings(abstract, shardings), latest, optimizer=self.optimizer
            )
        position = metadata.get("data_position", {}).get("next_step")
        if position != latest:
            raise ValueError(f"checkpoint: step {latest} records data position {position!r}, expected {latest}")
        return state, shardings

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def _metadata(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_position": {"next_step": step, "kind": self.config.data.kind},
            "config": self.config.to_dict(),
        }

    def save(self, *, wait: bool = False) -> None:
        """Checkpoints the current step (in the background unless ``wait``); a step already saved is skipped."""
        step = self.step
        if not self.checkpointer.save(self.state, self._metadata(step)):
            return
        if wait:
            self.checkpointer.wait_until_finished()
        how = "written" if wait or not self.config.checkpoint.async_save else "being written in the background"
        self.console.phase(f"checkpoint: step {step} {how} to {self.checkpointer.directory / str(step)}")

    def _batch(self, step: int) -> dict[str, jax.Array]:
        config = self.config
        seq_len = config.data.seq_len_at(step)
        return global_batch(
            lambda rows: self.source.train_batch(step, seq_len, config.batch_size, rows),
            self.batch_sharding,
            config.batch_size,
            seq_len,
        )

    def _run_step(self, step: int, previous_length: int | None, compiled: set[int]) -> tuple[Any, int, bool]:
        """(metrics, length, compiled now) of train step ``step``: announces a curriculum length switch, and the
        compile of a length not seen before (timed with its first step, which it waits for)."""
        batch = self._batch(step)
        length = int(batch["inputs"].shape[1])
        if previous_length is not None and length != previous_length:
            self.console.phase(f"curriculum: sequence length {previous_length} -> {length} at step {step}")
        if length in compiled:
            self.state, metrics = self._train_step(self.state, batch)
            return metrics, length, False
        compiled.add(length)
        what = f"compiling the train step for length {length} (batch {self.config.batch_size})"
        with self.console.timed_phase(what, "compiled and ran the first step"):
            self.state, metrics = self._train_step(self.state, batch)
            jax.block_until_ready(metrics)
        return metrics, length, True

    def run(self, stop_after: int | None = None) -> int:
        """Trains up to ``config.steps`` (or ``stop_after`` steps in this call); returns a process exit code.

        A SIGTERM/SIGINT saves a checkpoint at the current step and returns 0; running again resumes.
        """
        config = self.config
        start = self.step
        last_step = config.steps if stop_after is None else min(config.steps, start + stop_after)
        if start >= config.steps:
            self.logger.message(f"nothing to train: the checkpoint is at step {start} >= steps={config.steps}")
        throughput = Throughput(training_flops_per_token(config.model, config.data.seq_len), peak_flops_per_device())
        compiled_lengths: set[int] = set()
        seq_len = None
        progress = self.console.start_progress(config.steps, initial=start, desc="train")
        with _StopSignal() as stop, jax.set_mesh(self.mesh):
            for step in range(start, last_step):
                metrics, seq_len, compiled = self._run_step(step, seq_len, compiled_lengths)
                done = step + 1
                progress.update(done)
                if compiled:  # keep compilation out of the throughput
                    progress.restart_clock()
                    throughput.reset()
                else:
                    throughput.add(config.batch_size * seq_len)
                if done % config.log_every == 0 or done == last_step:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    values.update(throughput.values(), seq_len=seq_len)
                    self.logger.write("train", done, values)
                    progress.update(done, loss=values["loss"])
                    throughput.reset()
                if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                    self._log_eval(done)
                    progress.restart_clock()  # keep evaluation out of the throughput
                    throughput.reset()
                if done % config.checkpoint.every_steps == 0 or done == config.steps:
                    self.save()
                if stop.any_process():
                    self.save(wait=True)
                    self.logger.message(f"received signal {stop.received}: saved checkpoint at step {done}, exiting")
                    self._close()
                    return 0
            if last_step < config.steps:
                self.save(wait=True)
            self.checkpointer.wait_until_finished()
            progress.close()
            if last_step == config.steps and start < config.steps:
                self.final_report()
        self._close()
        return 0

    def _close(self) -> None:
        self.console.close()
        self.checkpointer.close()
        self.logger.close()

    def _log_eval(self, step: int) -> dict[int, dict[str, float]]:
        lengths = self.config.data.eval_lengths
        with self.console.timed_phase(
            f"evaluating at length(s) {', '.join(map(str, lengths))} (step {step})", "evaluated"
        ):
            results = self.evaluator.evaluate(self.state.params, lengths)
        for length, values in results.items():
            self.logger.write(f"eval_len{length}", step, values)
        return results

    def final_report(self) -> dict[int, dict[str, float]]:
        """Evaluates at every ``data.eval_lengths``; prints a table; for state tracking writes the JSON + PNG."""
        step = self.step
        with jax.set_mesh(self.mesh):
            results = self._log_eval(step)
        data = self.config.data
        self.logger.message(format_table(results, data.seq_len))
        if self.is_main and data.kind == "state_tracking":
            title = f"{data.group.upper()} state tracking, trained at length {data.seq_len} ({step} steps)"
            json_path, png_path = write_report(results, data.seq_len, self.workdir, title, {"step": step})
            self.logger.message(f"wrote {json_path} and {png_path}")
        if self.config.sample.prompts and is_prepared(data.path):
            self._print_samples()
        return results

    def _print_samples(self) -> None:
        """Continues ``config.sample.prompts`` with the trained model, prints them and writes ``samples.txt``
        (every process generates: the parameters may be sharded; only the main one prints and writes)."""
        from flax import nnx

        from m2rnn_jax.data.atomic import atomic_file
        from m2rnn_jax.data.tokenizer import load_tokenizer
        from m2rnn_jax.models.text_generation import continue_text

        sample = self.config.sample
        params = jax.device_get(self.state.params)
        with jax.set_mesh(without_context(self.mesh)):  # decoding runs token by token: no sequence split
            texts = continue_text(
                nnx.merge(self.graphdef, params),
                load_tokenizer(self.workdir),
                sample.prompts,
                max_new_tokens=sample.max_new_tokens,
                key=jax.random.key(self.config.seed),
                temperature=sample.temperature,
                top_p=sample.top_p,
            )
        report = "\n".join(
            f"--- sample {number} (step {self.step}) ---\n{text}" for number, text in enumerate(texts, 1)
        )
        self.logger.message(report)
        if self.is_main:
            with atomic_file(self.workdir / "samples.txt") as temporary:
                temporary.write_text(report + "\n")
