"""``m2rnn-jax generate``: continue a prompt of token ids with a trained or randomly initialised model.

Examples::

    m2rnn-jax generate --checkpoint runs/tiny --prompt-ids 1,2,3 --max-new-tokens 16
    m2rnn-jax generate --preset tiny-hybrid --prompt-ids 1,2,3 --max-new-tokens 16 --temperature 0.8 --top-p 0.9

``--checkpoint`` is a run directory written by ``m2rnn-jax train`` (its ``config.json`` gives the model unless
``--preset`` is given; ``--step`` picks a checkpoint, default the latest). Without ``--checkpoint`` the preset's
model is randomly initialised. Prints the generated token ids (without the prompt), comma-separated, on one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NAME = "generate"


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(NAME, help="generate tokens from a prompt with a preset model (optionally a checkpoint)")
    p.add_argument("--preset", help="model preset, e.g. tiny-hybrid (see `m2rnn-jax info --list`)")
    p.add_argument(
        "--checkpoint", help="run directory of m2rnn-jax train; without it the model is randomly initialised"
    )
    p.add_argument("--step", type=int, help="checkpoint step to load (default: the latest)")
    p.add_argument("--prompt-ids", required=True, type=_token_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="number of tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and for the random init")
    p.set_defaults(run=run)


def _restore_model(args: argparse.Namespace) -> Any:
    """The decoder of a training run, with the parameters of its checkpoint ``args.step`` (default latest)."""
    from flax import nnx

    from m2rnn_jax.train.config import TrainConfig
    from m2rnn_jax.train.presets import train_config
    from m2rnn_jax.train.restore import restore_params

    workdir = Path(args.checkpoint)
    saved_config = workdir / "config.json"
    if args.preset:
        config = train_config(args.preset)
    elif saved_config.is_file():
        config = TrainConfig.from_dict(json.loads(saved_config.read_text()))
    else:
        raise ValueError(
            f"checkpoint: expected a run directory holding config.json (or pass --preset), got {str(workdir)!r}"
        )
    restored = restore_params(config, workdir / "checkpoints", args.step)
    print(f"m2rnn-jax generate: loaded step {restored.step} from {str(workdir)!r}", file=sys.stderr)
    return nnx.merge(restored.graphdef, restored.params)


def _load_model(args: argparse.Namespace) -> Any:
    from flax import nnx

    from m2rnn_jax.models.decoder import Decoder
    from m2rnn_jax.models.presets import get_preset

    if args.checkpoint is not None:
        return _restore_model(args)
    if args.preset is None:
        raise ValueError("preset: expected --preset NAME (or --checkpoint RUN_DIR), got neither")
    print(
        f"m2rnn-jax generate: no --checkpoint given, using randomly initialised weights (seed {args.seed})",
        file=sys.stderr,
    )
    return Decoder(get_preset(args.preset), rngs=nnx.Rngs(args.seed))


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from m2rnn_jax.models.generation import generate

    try:
        model = _load_model(args)
        vocab_size = model.config.vocab_size
        if any(not 0 <= token < vocab_size for token in args.prompt_ids):
            raise ValueError(f"prompt-ids: expected ids in [0, {vocab_size}), got {args.prompt_ids}")
        tokens = generate(
            model,
            jnp.asarray([args.prompt_ids], dtype=jnp.int32),
            max_new_tokens=args.max_new_tokens,
            key=jax.random.key(args.seed),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )
    except ValueError as err:
        print(f"m2rnn-jax generate: {err}", file=sys.stderr)
        return 2
    new_tokens = tokens[0, len(args.prompt_ids):].tolist()
    print(",".join(str(token) for token in new_tokens))
    return 0
