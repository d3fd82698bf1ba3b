"""``m2rnn-jax train``: train a preset or a config file, with ``--set`` overrides, resuming from ``--workdir``.

Examples::

    m2rnn-jax train --preset state-tracking-s3-tiny --workdir runs/s3
    m2rnn-jax train --preset tiny-hybrid --set mesh.data=2 --set mesh.tensor=4 --workdir runs/hybrid
    m2rnn-jax train --config my_run.yaml --set optimizer.learning_rate=1e-3 --workdir runs/mine
    m2rnn-jax train --preset tiny-m2rnn --set data.kind=token_file --set data.path=data/corpus --workdir runs/text

Running the same command again with the same ``--workdir`` resumes from the latest checkpoint; so does
``m2rnn-jax train --workdir RUN`` alone (the run's own config.json), with ``--set`` for the fields that may change
on resume (``steps``, ``eval_every``, ``log_every``, ``checkpoint.*``, ...: ``RESUME_CHANGEABLE`` in
:mod:`m2rnn_jax.train.restore`). A workdir holding a different run is an error naming the differing fields;
``--restart`` renames it to ``RUN.replaced-<time>`` and starts a new run there (with the stored config when neither
``--preset`` nor ``--config`` is given). See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

from m2rnn_jax.commands.arguments import add_compile_cache_argument, check_backend_hardware
from m2rnn_jax.commands.errors import fail

NAME = "train"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared with ``m2rnn-jax eval``."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help="training or model preset (m2rnn-jax info --list)")
    source.add_argument("--config", help="YAML/JSON file: a full config, or {preset: NAME, ...overrides}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set optimizer.learning_rate=1e-3 (repeatable)",
    )


def add_parser(subparsers: Any) -> None:
    from m2rnn_jax.parallel.distributed import add_distributed_arguments

    p = subparsers.add_parser(NAME, help="train a model (sharded over all devices), resuming from --workdir")
    add_config_arguments(p)
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, plots")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over: move an existing --workdir aside (renamed to WORKDIR.replaced-<time>, nothing "
        "deleted) instead of resuming it",
    )
    add_compile_cache_argument(p)
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace, workdir_config: dict | None = None):
    """The TrainConfig from --preset / --config (or a saved run config) plus the --set overrides; for a prepared
    text directory in data.path, its dtype, EOS id and (unless set explicitly) vocabulary size."""
    from m2rnn_jax.train.config import TrainConfig, load_config_file, resolve_token_data
    from m2rnn_jax.train.overrides import apply_overrides, merge
    from m2rnn_jax.train.presets import train_config

    explicit_vocab = any(item.split("=", 1)[0].strip() == "model.vocab_size" for item in args.overrides)
    if args.preset:
        config = train_config(args.preset)
    elif args.config:
        data = load_config_file(args.config)
        preset = data.pop("preset", None)
        explicit_vocab |= not preset or "vocab_size" in (data.get("model") or {})
        config = merge(train_config(preset), data) if preset else TrainConfig.from_dict(data)
    elif workdir_config is not None:
        config = TrainConfig.from_dict(workdir_config)
        explicit_vocab = True  # the run's model is fixed
    else:
        raise ValueError("--preset or --config: expected one of them (or a --workdir holding config.json)")
    return resolve_token_data(apply_overrides(config, args.overrides), keep_vocab_size=explicit_vocab)


def check_backends(config: Any) -> None:
    """ValueError naming ``model.<mixer>.backend`` when a mixer's backend needs hardware this machine lacks."""
    for name, value in vars(config.model).items():
        backend = getattr(value, "backend", None)
        if isinstance(backend, str):
            check_backend_hardware(f"model.{name}.backend", backend)


def _restart(workdir: str) -> None:
    """--restart: the main process renames the old run; every process waits for it."""
    import jax

    from m2rnn_jax.train.restore import move_run_aside

    if jax.process_index() == 0:
        moved = move_run_aside(workdir)
        if moved is not None:
            print(f"-- moved the previous run {workdir} to {moved} (--restart)", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("m2rnn-jax train --restart")


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.parallel.distributed import initialize_distributed
    from m2rnn_jax.train.compile_cache import use_compile_cache

    try:
        use_compile_cache(args.compile_cache)
        initialize_distributed(args)
        from m2rnn_jax.train.restore import read_run_config

        stored = None if args.preset or args.config else read_run_config(args.workdir, "--workdir")
        config = resolve_config(args, stored)
        check_backends(config)
        if args.restart:
            _restart(args.workdir)
        from m2rnn_jax.train.trainer import Trainer

        name = args.preset or args.config or f"the run in {args.workdir}"
        trainer = Trainer(config, args.workdir, name=name)
    except ValueError as err:
        return fail(NAME, err)
    return trainer.run()
