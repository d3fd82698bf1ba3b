"""``m2rnn-jax prepare-data``: text files or a Hugging Face dataset -> train/validation token files + tokenizer.

Examples::

    m2rnn-jax prepare-data 'corpus/*.txt' --train-tokenizer 8192 --output data/corpus
    m2rnn-jax prepare-data shards/*.jsonl --text-field content --tokenizer gpt2/tokenizer.json --output data/web
    m2rnn-jax prepare-data --hf-dataset ./my_dataset_saved_to_disk --hf-split train --tokenizer cl100k.tiktoken \\
        --output data/hf

Then train with ``--set data.kind=token_file --set data.path=data/corpus``. The output format is described in
``docs/text_data.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

from m2rnn_jax.commands.errors import fail

NAME = "prepare-data"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(NAME, help="tokenize text files or a dataset into train/validation token files")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files or globs: .txt, .jsonl, .parquet")
    p.add_argument("--output", required=True, help="output directory (created if needed)")
    tokenizer = p.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", help="tokenizer.json, a .tiktoken BPE file, or a directory holding one")
    tokenizer.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this vocabulary size on the training documents",
    )
    p.add_argument("--eos-token", help="the end-of-document token of --tokenizer (default: <|endoftext|>, </s>, ...)")
    p.add_argument(
        "--txt-documents",
        choices=("file", "paragraph"),
        default="file",
        help="a .txt file is one document (file, default) or one per blank-line-separated block",
    )
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet rows and datasets")
    p.add_argument("--hf-dataset", help="a datasets name or local folder (save_to_disk output or data files)")
    p.add_argument("--hf-split", default="train", help="dataset split (default train)")
    p.add_argument("--hf-config", help="dataset configuration name")
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.01,
        help="fraction of documents held out for validation (default 0.01, at least one document)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (shown only when stderr is a terminal; the phase lines stay)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from m2rnn_jax.data.text import Corpus, prepare_text_data
    from m2rnn_jax.data.tokenizer import load_tokenizer
    from m2rnn_jax.train.progress import Console

    console = Console()
    # tqdm bars (tokenizer training, tokenizing) only on a terminal: in a log they are carriage-return noise; there
    # the phase lines below say what runs and how long it took.
    bars = not args.quiet and sys.stderr.isatty()
    try:
        corpus = Corpus(
            inputs=tuple(args.inputs),
            txt_documents=args.txt_documents,
            text_field=args.text_field,
            hf_dataset=args.hf_dataset,
            hf_split=args.hf_split,
            hf_config=args.hf_config,
        )
        tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token) if args.tokenizer else None
        source = (
            f"dataset {args.hf_dataset} (split {args.hf_split})"
            if args.hf_dataset
            else f"{len(args.inputs)} input pattern(s): {' '.join(args.inputs)}"
        )
        console.header(
            f"m2rnn-jax {NAME}: {args.output}",
            [
                ("inputs", source),
                ("tokenizer", args.tokenizer or f"byte-level BPE trained here, vocabulary {args.train_tokenizer}"),
                ("validation", f"{args.validation_fraction:g} of the documents (seed {args.seed})"),
            ],
        )
        with console.timed_phase(
            "counting documents, " + ("training the tokenizer, " if tokenizer is None else "") + "tokenizing", "written"
        ):
            meta = prepare_text_data(
                corpus,
                args.output,
                tokenizer=tokenizer,
                train_vocab_size=args.train_tokenizer,
                tokenizer_source=args.tokenizer or "",
                validation_fraction=args.validation_fraction,
                seed=args.seed,
                progress=bars,
            )
    except ValueError as err:
        return fail(NAME, err)
    for split, entry in meta["splits"].items():
        print(
            f"{split}: {entry['documents']} documents, {entry['tokens']} tokens, {entry['bytes']} bytes "
            f"({entry['bytes'] / max(entry['tokens'], 1):.2f} bytes/token)"
        )
    print(f"vocab_size {meta['vocab_size']}, eos_token_id {meta['eos_token_id']}, dtype {meta['dtype']}")
    print(f"wrote {args.output}/meta.json")
    return 0
