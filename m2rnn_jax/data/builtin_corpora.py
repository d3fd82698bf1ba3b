"""Real English text that ships with Python itself, for demos and tests that must not download anything.

``python-docs``: the topic pages of the Python language reference that ``help()`` shows (``pydoc_data.topics``,
part of every CPython install): 79 pages, ~465k characters of technical English with some grammar and code. Each
page is cut into documents at its section headings (a title line underlined with ``*``, ``=`` or ``-``), so the
validation split (by documents) holds whole sections.

A training config names a built-in corpus as ``data.path=builtin:NAME``: :func:`prepared_builtin_corpus` turns it
into a directory in the ``m2rnn-jax prepare-data`` format, prepared once (byte-level BPE of the corpus's vocabulary
size, 5% of the documents held out, seed 0) under ``$M2RNN_JAX_CACHE`` (default ``~/.cache/m2rnn-jax``) and reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
CACHE_ENVIRONMENT_VARIABLE = "M2RNN_JAX_CACHE"

_HEADING = re.compile(r"\n(?=[^\n]+\n[*=\-]{3,}\n)")  # split before a title line followed by its underline


def _sections(page: str) -> list[str]:
    return [part.strip() for part in _HEADING.split(page) if part.strip()]


def python_docs_documents() -> list[str]:
    """The sections of every ``pydoc_data.topics`` page, in topic-name order (deterministic)."""
    from pydoc_data.topics import topics

    return [section for name in sorted(topics) for section in _sections(topics[name])]


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus that ships with the install: its documents and how it is tokenized."""

    documents: Callable[[], list[str]]
    vocab_size: int
    validation_fraction: float = 0.05


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {"python-docs": BuiltinCorpus(python_docs_documents, vocab_size=4096)}


def _lookup(name: str) -> BuiltinCorpus:
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"corpus: expected one of {sorted(BUILTIN_CORPORA)}, got {name!r}")
    return BUILTIN_CORPORA[name]


def builtin_corpus(name: str) -> list[str]:
    """The documents of the built-in corpus ``name`` (one of :data:`BUILTIN_CORPORA`)."""
    return _lookup(name).documents()


def cache_directory() -> Path:
    """Where prepared built-in corpora live: ``$M2RNN_JAX_CACHE`` or ``~/.cache/m2rnn-jax``."""
    return Path(os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or Path.home() / ".cache" / "m2rnn-jax")


def prepared_builtin_corpus(name: str, *, progress: bool = True) -> Path:
    """The prepared directory of the built-in corpus ``name``, tokenized on first use (then reused).

    The directory counts as prepared once its ``meta.json`` exists, which prepare-data writes last, so an
    interrupted preparation is simply done again.
    """
    from m2rnn_jax.data.text import Corpus, prepare_text_data

    corpus = _lookup(name)
    output = cache_directory() / "corpora" / f"{name}-bpe{corpus.vocab_size}"
    if (output / "meta.json").is_file():
        return output
    with tempfile.TemporaryDirectory() as tmp:
        documents = Path(tmp) / f"{name}.jsonl"
        documents.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus.documents()))
        prepare_text_data(
            Corpus(inputs=(str(documents),)),
            output,
            train_vocab_size=corpus.vocab_size,
            validation_fraction=corpus.validation_fraction,
            seed=0,
            progress=progress,
        )
    return output
