"""The built-in corpora: real text from the Python install, cut into documents deterministically, prepared once."""

from __future__ import annotations

import json

import pytest

from m2rnn_jax.data.builtin_corpora import builtin_corpus, prepared_builtin_corpus
from m2rnn_jax.train.config import resolve_token_data
from m2rnn_jax.train.presets import train_config


def test_python_docs_is_english_text_in_sections():
    documents = builtin_corpus("python-docs")
    assert len(documents) > 100  # 79 pages cut at their section headings
    assert sum(map(len, documents)) > 400_000
    assert all(doc == doc.strip() and doc for doc in documents)
    joined = "\n".join(documents)
    assert 'The "if" statement' in joined and " the " in joined
    assert documents == builtin_corpus("python-docs")  # deterministic order


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match=r"corpus: expected one of \['python-docs'\], got 'wikipedia'"):
        builtin_corpus("wikipedia")


def test_builtin_path_is_prepared_once_into_the_cache_and_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("M2RNN_JAX_CACHE", str(tmp_path))
    config = resolve_token_data(train_config("text-demo"), keep_vocab_size=True)
    directory = tmp_path / "corpora" / "python-docs-bpe4096"
    assert config.data.path == str(directory)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["vocab_size"] == config.model.vocab_size == 4096
    assert meta["splits"]["validation"]["documents"] >= 5 and meta["splits"]["train"]["tokens"] > 90_000
    stamp = (directory / "train.bin").stat().st_mtime_ns
    assert prepared_builtin_corpus("python-docs", progress=False) == directory
    assert (directory / "train.bin").stat().st_mtime_ns == stamp  # reused, not prepared again
