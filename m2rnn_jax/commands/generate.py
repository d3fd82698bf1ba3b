"""``m2rnn-jax generate``: continue a prompt of token ids with a preset model (greedy or sampled).

Prints the generated token ids (without the prompt), comma-separated, on one line.
"""

from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--preset", required=True, help="model preset, e.g. tiny-hybrid (see `m2rnn-jax info --list`)")
    p.add_argument("--checkpoint", help="training checkpoint directory; without it the model is randomly initialised")
    p.add_argument("--prompt-ids", required=True, type=_token_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="number of tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and for the random init")
    p.set_defaults(run=run)


def _load_model(args: argparse.Namespace) -> Any:
    from flax import nnx

    from m2rnn_jax.models.decoder import Decoder
    from m2rnn_jax.models.presets import get_preset

    config = get_preset(args.preset)
    if args.checkpoint is None:
        print(
            f"m2rnn-jax generate: no --checkpoint given, using randomly initialised weights (seed {args.seed})",
            file=sys.stderr,
        )
        return Decoder(config, rngs=nnx.Rngs(args.seed))
    raise ValueError(
        "checkpoint: loading needs the training checkpoint module m2rnn_jax.train.checkpoint, "
        "which is not available in this version"
    )


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
