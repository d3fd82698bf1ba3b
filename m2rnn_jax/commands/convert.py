"""``m2rnn-jax convert``: lm-engine checkpoints <-> m2rnn-jax run directories, tensor by tensor.

    m2rnn-jax convert --from-lm-engine LME_DIR --workdir runs/imported [--preset P] [--set KEY=VALUE ...]
    m2rnn-jax convert --to-lm-engine --checkpoint runs/imported --output LME_DIR [--step N]

``LME_DIR`` holds lm-engine's ``config.json`` (``gpt_base``) and ``model.safetensors`` (or shards listed by
``model.safetensors.index.json``). Importing writes ``config.json`` and an Orbax checkpoint at step 0 that
``m2rnn-jax train / eval / generate`` resume from; ``--preset`` / ``--config`` / ``--set`` choose the training
settings around the converted model (default: the short random-token run of a model preset). Exit 0 on success,
2 on bad input (untranslatable config field, missing / unexpected / wrongly shaped tensor).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from typing import Any

from m2rnn_jax.commands.errors import fail

NAME = "convert"


def add_parser(subparsers: Any) -> None:
    from m2rnn_jax.commands.train import add_config_arguments

    p = subparsers.add_parser(NAME, help="convert checkpoints between lm-engine (safetensors) and m2rnn-jax (Orbax)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-lm-engine", metavar="SRC", help="lm-engine checkpoint directory to import")
    direction.add_argument("--to-lm-engine", action="store_true", help="export --checkpoint to --output")
    p.add_argument("--workdir", help="run directory to create (with --from-lm-engine)")
    p.add_argument("--checkpoint", help="run directory to export (with --to-lm-engine)")
    p.add_argument("--output", help="lm-engine directory to write (with --to-lm-engine)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    for name in ("bos", "eos", "pad"):
        p.add_argument(f"--{name}-token-id", type=int, default=0, help="written to the lm-engine config (metadata)")
    add_config_arguments(p)
    p.set_defaults(run=run)


def _make_config(args: argparse.Namespace):
    """model config -> the run's TrainConfig: --preset / --config (or the default short run), model replaced by the
    converted one (keeping the preset's dtypes and remat), then --set overrides."""
    from m2rnn_jax.commands.train import resolve_config
    from m2rnn_jax.train.overrides import apply_overrides
    from m2rnn_jax.train.presets import default_train_config

    def make(model):
        if args.preset or args.config:
            base = resolve_config(argparse.Namespace(preset=args.preset, config=args.config, overrides=[]))
            model = model.replace(dtype=base.model.dtype, param_dtype=base.model.param_dtype, remat=base.model.remat)
            base = dataclasses.replace(base, model=model)
        else:
            base = default_train_config(model)
        return apply_overrides(base, args.overrides)

    return make


def _require(args: argparse.Namespace, needed: tuple[str, ...], unused: tuple[str, ...], mode: str) -> None:
    for name in needed:
        if getattr(args, name) is None:
            raise ValueError(f"--{name}: required with {mode}")
    for name in unused:
        if getattr(args, name) not in (None, [], False):
            raise ValueError(f"--{name.replace('_', '-')}: not used with {mode}")


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.interop.checkpoints import export_lm_engine, import_lm_engine

    start = time.perf_counter()
    try:
        if args.from_lm_engine:
            _require(args, ("workdir",), ("checkpoint", "output", "step"), "--from-lm-engine")
            config = import_lm_engine(args.from_lm_engine, args.workdir, _make_config(args))
            summary = f"wrote {args.workdir}/config.json and checkpoints/0 ({config.model.layer_pattern})"
        else:
            _require(args, ("checkpoint", "output"), ("workdir", "preset", "config", "overrides"), "--to-lm-engine")
            stats = export_lm_engine(
                args.checkpoint,
                args.output,
                args.step,
                bos_token_id=args.bos_token_id,
                eos_token_id=args.eos_token_id,
                pad_token_id=args.pad_token_id,
            )
            summary = (
                f"wrote {args.output}/model.safetensors ({stats['num_tensors']} tensors, "
                f"{stats['num_parameters']:,} parameters, step {stats['step']}) and config.json"
            )
    except ValueError as err:
        return fail(NAME, err)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{summary}; {time.perf_counter() - start:.1f} s, peak RSS {peak_gib:.2f} GiB")
    return 0
