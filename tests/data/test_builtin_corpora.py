"""The built-in corpora: real text from the Python install, cut into documents deterministically."""

from __future__ import annotations

import pytest

from m2rnn_jax.data.builtin_corpora import builtin_corpus


def test_python_docs_is_english_text_in_sections():
    documents = builtin_corpus("python-docs")
    assert len(documents) > 100  # 79 pages cut at their section headings
    assert sum(map(len, documents)) > 400_000
    assert all(doc == doc.strip() and doc for doc in documents)
    joined = "\n".join(documents)
    assert "The \"if\" statement" in joined and " the " in joined
    assert documents == builtin_corpus("python-docs")  # deterministic order


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match=r"corpus: expected one of \['python-docs'\], got 'wikipedia'"):
        builtin_corpus("wikipedia")
