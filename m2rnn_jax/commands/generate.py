"""``m2rnn-jax generate``: continue text prompts (or one prompt of token ids) with a trained or random model.

Examples::

    m2rnn-jax generate --checkpoint runs/text --prompt "Once upon a time" --prompt "The" --max-new-tokens 64
    m2rnn-jax generate --checkpoint runs/tiny --prompt-ids 1,2,3 --max-new-tokens 16
    m2rnn-jax generate --preset tiny-hybrid --prompt-ids 1,2,3 --max-new-tokens 16 --temperature 0.8 --top-p 0.9

``--checkpoint`` is a run directory written by ``m2rnn-jax train`` (its ``config.json`` gives the model unless
``--preset`` is given; ``--step`` picks a checkpoint, default the latest). Without ``--checkpoint`` the preset's
model is randomly initialised.

``--prompt`` (repeatable) encodes text with the run's tokenizer (the one ``train`` copied into the run directory,
or ``--tokenizer``); each prompt is preceded by the EOS token (every training document follows one), all prompts
run as one batch (:func:`m2rnn_jax.models.generation.generate_ragged`: left padding, the padding its own document),
the new tokens stop at the first EOS, and the prompt followed by its continuation is printed under a
``=== prompt N ===`` line. ``--prompt-ids`` prints the generated token ids (without the prompt), comma-separated,
on one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from m2rnn_jax.commands.arguments import add_compile_cache_argument, check_preset, existing_directory
from m2rnn_jax.commands.errors import fail

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
    p = subparsers.add_parser(NAME, help="generate text or tokens from prompts with a trained or random model")
    p.add_argument("--preset", help="model preset, e.g. tiny-hybrid (see `m2rnn-jax info --list`)")
    p.add_argument(
        "--checkpoint", help="run directory of m2rnn-jax train; without it the model is randomly initialised"
    )
    p.add_argument("--step", type=int, help="checkpoint step to load (default: the latest)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text (repeatable: one batch of prompts)")
    prompts.add_argument("--prompt-ids", type=_token_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--tokenizer", help="tokenizer for --prompt (default: the one in the --checkpoint directory)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="number of tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and for the random init")
    add_compile_cache_argument(p)
    p.set_defaults(run=run)


def _train_config(args: argparse.Namespace) -> Any:
    """The training config of ``--checkpoint`` (its config.json), or None for a bare ``--preset``."""
    from m2rnn_jax.train.config import TrainConfig
    from m2rnn_jax.train.presets import train_config
    from m2rnn_jax.train.restore import check_same_model

    if args.preset:
        check_preset("--preset", args.preset)
    if args.checkpoint is None:
        return None
    saved_config = existing_directory("--checkpoint", args.checkpoint, "run directory") / "config.json"
    if args.preset:
        config = train_config(args.preset)
        check_same_model(args.checkpoint, config, "--checkpoint")
        return config
    if saved_config.is_file():
        return TrainConfig.from_dict(json.loads(saved_config.read_text()))
    raise ValueError(
        f"--checkpoint: expected a run directory holding config.json (or pass --preset), got {args.checkpoint!r}"
    )


def _model_config(args: argparse.Namespace, config: Any) -> Any:
    from m2rnn_jax.train.presets import get_preset

    if config is not None:
        return config.model
    if args.preset is None:
        raise ValueError("--preset: expected --preset NAME (or --checkpoint RUN_DIR), got neither")
    return get_preset(args.preset)


def _load_model(args: argparse.Namespace, config: Any, model_config: Any) -> Any:
    """The decoder: checkpoint ``args.step`` (default latest) of the run, or randomly initialised."""
    from flax import nnx

    from m2rnn_jax.models.decoder import Decoder
    from m2rnn_jax.train.restore import restore_params

    if config is not None:
        restored = restore_params(config, Path(args.checkpoint) / "checkpoints", args.step, flag="--checkpoint")
        print(f"m2rnn-jax generate: loaded step {restored.step} from {args.checkpoint!r}", file=sys.stderr)
        return nnx.merge(restored.graphdef, restored.params)
    print(
        f"m2rnn-jax generate: no --checkpoint given, using randomly initialised weights (seed {args.seed})",
        file=sys.stderr,
    )
    return Decoder(model_config, rngs=nnx.Rngs(args.seed))


def _load_tokenizer(args: argparse.Namespace) -> Any:
    from m2rnn_jax.data.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.checkpoint is None:
        raise ValueError("--tokenizer: expected --tokenizer PATH (or a --checkpoint run trained on text) for --prompt")
    try:
        return load_tokenizer(args.checkpoint)
    except ValueError as err:
        raise ValueError(
            f"--tokenizer: expected --tokenizer PATH or a run trained on text prepared by m2rnn-jax "
            f"prepare-data, got the run {args.checkpoint!r} without a tokenizer ({err})"
        ) from err


def _continue(model: Any, prompts: list[list[int]], args: argparse.Namespace) -> list[np.ndarray]:
    """The new tokens of each prompt, all prompts in one batch (left-padded when their lengths differ)."""
    import jax

    from m2rnn_jax.models.generation import generate_ragged

    return generate_ragged(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        key=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.models.text_generation import encode_prompts, until_eos
    from m2rnn_jax.train.compile_cache import use_compile_cache

    try:
        use_compile_cache(args.compile_cache)
        config = _train_config(args)
        model_config = _model_config(args, config)
        vocab_size = model_config.vocab_size
        tokenizer = None
        if args.prompt is not None:
            tokenizer = _load_tokenizer(args)
            prompts = encode_prompts(tokenizer, args.prompt)
            bad = [i for i, p in enumerate(prompts, 1) if max(p) >= vocab_size]
            if bad:
                raise ValueError(
                    f"--prompt: expected token ids below model.vocab_size={vocab_size} (tokenizer "
                    f"vocabulary {tokenizer.vocab_size}), got larger ones in prompt(s) {bad}"
                )
        else:
            prompts = [args.prompt_ids]
            if any(not 0 <= token < vocab_size for token in args.prompt_ids):
                raise ValueError(f"--prompt-ids: expected ids in [0, {vocab_size}), got {args.prompt_ids}")
        model = _load_model(args, config, model_config)
        continuations = _continue(model, prompts, args)
    except ValueError as err:
        return fail(NAME, err)
    if tokenizer is None:
        print(",".join(str(token) for token in continuations[0].tolist()))
        return 0
    for number, (prompt, new_tokens) in enumerate(zip(prompts, continuations), 1):
        kept = until_eos(new_tokens, tokenizer.eos_token_id, tokenizer.vocab_size)
        print(f"=== prompt {number} ===")
        print(tokenizer.decode(prompt[1:] + kept))
    return 0
