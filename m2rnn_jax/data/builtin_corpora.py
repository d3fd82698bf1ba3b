"""Real English text that ships with Python itself, for demos and tests that must not download anything.

``python-docs``: the topic pages of the Python language reference that ``help()`` shows (``pydoc_data.topics``,
part of every CPython install): 79 pages, ~465k characters of technical English with some grammar and code. Each
page is cut into documents at its section headings (a title line underlined with ``*``, ``=`` or ``-``), so the
validation split (by documents) holds whole sections.
"""

from __future__ import annotations

import re
from typing import Callable

_HEADING = re.compile(r"\n(?=[^\n]+\n[*=\-]{3,}\n)")  # split before a title line followed by its underline


def _sections(page: str) -> list[str]:
    return [part.strip() for part in _HEADING.split(page) if part.strip()]


def python_docs_documents() -> list[str]:
    """The sections of every ``pydoc_data.topics`` page, in topic-name order (deterministic)."""
    from pydoc_data.topics import topics

    return [section for name in sorted(topics) for section in _sections(topics[name])]


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {"python-docs": python_docs_documents}


def builtin_corpus(name: str) -> list[str]:
    """The documents of the built-in corpus ``name`` (one of :data:`BUILTIN_CORPORA`)."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"corpus: expected one of {sorted(BUILTIN_CORPORA)}, got {name!r}")
    return BUILTIN_CORPORA[name]()
