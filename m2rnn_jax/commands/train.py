"""``m2rnn-jax train``: train a preset or a config file, with ``--set`` overrides, resuming from ``--workdir``.

Examples::

    m2rnn-jax train --preset state-tracking-s3-tiny --workdir runs/s3
    m2rnn-jax train --preset tiny-hybrid --set mesh.data=2 --set mesh.tensor=4 --workdir runs/hybrid
    m2rnn-jax train --config my_run.yaml --set optimizer.learning_rate=1e-3 --workdir runs/mine
    m2rnn-jax train --preset tiny-m2rnn --set data.kind=token_file --set data.path=data/corpus --workdir runs/text

Running the same command again with the same ``--workdir`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

NAME = "train"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared with ``m2rnn-jax eval``."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help="training or model preset (m2rnn-jax info --list)")
    source.add_argument("--config", help="YAML/JSON file: a full config, or {preset: NAME, ...overrides}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optimizer.learning_rate=1e-3 (repeatable)")


def add_parser(subparsers: Any) -> None:
    from m2rnn_jax.parallel.distributed import add_distributed_arguments

    p = subparsers.add_parser(NAME, help="train a model (sharded over all devices), resuming from --workdir")
    add_config_arguments(p)
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, plots")
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


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.parallel.distributed import initialize_distributed

    try:
        initialize_distributed(args)
        config = resolve_config(args)
        from m2rnn_jax.train.trainer import Trainer

        trainer = Trainer(config, args.workdir)
    except ValueError as err:
        print(f"m2rnn-jax train: error: {err}", file=sys.stderr)
        return 2
    return trainer.run()
