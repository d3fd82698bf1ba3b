"""Text corpora -> token files: readers, the document split, the files written and their round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2rnn_jax.data.text import (
    Corpus,
    expand_inputs,
    file_documents,
    prepare_text_data,
    token_dtype,
    validation_documents,
)
from m2rnn_jax.data.tokenizer import DEFAULT_EOS, load_tokenizer, train_byte_level_bpe

DOCUMENTS = [f"Document {i}: the {'quick brown fox ' * (i % 3 + 1)}jumps. Ünïcödé {i} 😀" for i in range(12)]


def _write_jsonl(path, documents, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(documents)))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe(DOCUMENTS, 320)


def test_expand_inputs_globs_in_order_and_names_what_is_missing(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "notes.md").write_text("x")
    files = expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "a.txt")])
    assert [p.name for p in files] == ["a.txt", "b.txt", "c.jsonl"]
    with pytest.raises(ValueError, match=r"INPUT: no files matched '.*\*\.parquet'"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(ValueError, match="INPUT: expected files ending in .txt, .jsonl, .parquet, got .*notes.md"):
        expand_inputs([str(tmp_path / "notes.md")])


def test_txt_documents_per_file_or_per_paragraph(tmp_path):
    path = tmp_path / "two.txt"
    path.write_bytes(b"first paragraph\nstill first\n\nsecond\r\n \r\n\n\nthird\r\n")
    assert list(file_documents(path, "file")) == ["first paragraph\nstill first\n\nsecond\r\n \r\n\n\nthird\r\n"]
    assert [d for d in file_documents(path, "paragraph") if d] == ["first paragraph\nstill first", "second", "third"]


def test_jsonl_and_parquet_read_the_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:3], field="content")
    assert list(file_documents(jsonl, text_field="content")) == DOCUMENTS[:3]
    with pytest.raises(
        ValueError,
        match=r"--text-field: expected a field 'text' in .*line 1, got the fields "
        r"\['content', 'id'\]",
    ):
        list(file_documents(jsonl))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl' line 2 is not JSON"):
        list(file_documents(tmp_path / "bad.jsonl"))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": DOCUMENTS[:4], "n": list(range(4))}), parquet)
    assert list(file_documents(parquet, text_field="body")) == DOCUMENTS[:4]
    with pytest.raises(ValueError, match=r"expected a field 'text' in .*docs.parquet', got the fields \['body', 'n'\]"):
        list(file_documents(parquet))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="INPUT: cannot read .*latin1.txt.* as UTF-8 text"):
        list(file_documents(tmp_path / "latin1.txt"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="INPUT: cannot read .*junk.parquet.* as parquet"):
        list(file_documents(tmp_path / "junk.parquet"))


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """``datasets`` with the Hub switched off and its cache under tmp_path."""
    datasets = pytest.importorskip("datasets")  # installed with the package; absent from some GPU images
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return datasets


def test_hf_datasets_load_offline_from_disk_and_from_a_data_folder(tmp_path, offline_datasets):
    datasets = offline_datasets
    split = datasets.Dataset.from_dict({"text": DOCUMENTS[:5], "n": list(range(5))})
    datasets.DatasetDict({"train": split, "test": split.select([0])}).save_to_disk(str(tmp_path / "dict"))
    split.save_to_disk(str(tmp_path / "single"))
    assert list(Corpus(hf_dataset=str(tmp_path / "dict"))) == DOCUMENTS[:5]
    assert list(Corpus(hf_dataset=str(tmp_path / "dict"), hf_split="test")) == DOCUMENTS[:1]
    assert list(Corpus(hf_dataset=str(tmp_path / "single"))) == DOCUMENTS[:5]
    with pytest.raises(ValueError, match=r"--hf-split: expected one of \['test', 'train'\]"):
        list(Corpus(hf_dataset=str(tmp_path / "dict"), hf_split="validation"))
    with pytest.raises(ValueError, match=r"expected a field 'body' in dataset .*got the fields \['n', 'text'\]"):
        list(Corpus(hf_dataset=str(tmp_path / "single"), text_field="body"))
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", DOCUMENTS[:6])
    assert list(Corpus(hf_dataset=str(folder))) == DOCUMENTS[:6]
    with pytest.raises(ValueError, match="--hf-dataset: cannot load .*missing"):
        list(Corpus(hf_dataset=str(tmp_path / "missing")))


def test_validation_documents_are_deterministic_per_seed():
    a = validation_documents(200, 0.1, seed=0)
    assert a.sum() == 20 and np.array_equal(a, validation_documents(200, 0.1, seed=0))
    assert not np.array_equal(a, validation_documents(200, 0.1, seed=1))
    assert validation_documents(3, 0.01, 0).sum() == 1 and validation_documents(3, 0.99, 0).sum() == 2
    with pytest.raises(ValueError, match="expected at least 2 non-empty documents"):
        validation_documents(1, 0.5, 0)
    with pytest.raises(ValueError, match=r"--validation-fraction: expected a value in \(0, 1\), got 1.5"):
        validation_documents(10, 1.5, 0)


def test_token_dtype_widens_past_65536():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def _split_documents(offsets_path, tokens, eos):
    offsets = np.load(offsets_path)
    ends = list(offsets[1:]) + [len(tokens)]
    assert all(tokens[end - 1] == eos for end in ends)
    return [tokens[start : end - 1] for start, end in zip(offsets, ends)]


def test_prepared_files_round_trip_to_the_documents(tmp_path, tokenizer):
    documents = DOCUMENTS + [""]  # the empty document is skipped
    corpus = Corpus(inputs=(str(_write_jsonl(tmp_path / "docs.jsonl", documents)),))
    out = tmp_path / "out"
    meta = prepare_text_data(
        corpus, out, tokenizer=tokenizer, tokenizer_source="test", validation_fraction=0.25, seed=3, progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "tokenizer.json", "train.bin", "train.offsets.npy", "validation.bin", "validation.offsets.npy"]
    )
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tokenizer.vocab_size
    assert meta["tokenizer"] == {
        "kind": "huggingface",
        "source": "test",
        "files": ["tokenizer.json"],
        "byte_lengths_exact": True,
    }
    held_out = validation_documents(len(DOCUMENTS), 0.25, 3)
    loaded = load_tokenizer(out)
    for split, chosen in (("train", ~held_out), ("validation", held_out)):
        expected = [d for d, keep in zip(DOCUMENTS, chosen) if keep]
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert loaded.decode(tokens) == "".join(d + DEFAULT_EOS for d in expected)
        assert [
            loaded.decode(doc) for doc in _split_documents(out / f"{split}.offsets.npy", tokens, meta["eos_token_id"])
        ] == expected
        entry = meta["splits"][split]
        assert entry["tokens"] == len(tokens) and entry["documents"] == len(expected)
        assert entry["bytes"] == sum(len(d.encode()) for d in expected)
    # Same seed, same split and files; another seed, another split.
    again = prepare_text_data(
        corpus, tmp_path / "again", tokenizer=tokenizer, validation_fraction=0.25, seed=3, progress=False
    )
    assert again["splits"] == meta["splits"]
    other = prepare_text_data(
        corpus, tmp_path / "other", tokenizer=tokenizer, validation_fraction=0.25, seed=4, progress=False
    )
    assert other["splits"]["validation"]["bytes"] != meta["splits"]["validation"]["bytes"]


def test_a_trained_tokenizer_learns_from_the_training_documents_only(tmp_path):
    corpus = Corpus(inputs=(str(_write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)),))
    meta = prepare_text_data(corpus, tmp_path / "out", train_vocab_size=300, validation_fraction=0.2, progress=False)
    assert meta["tokenizer"]["kind"] == "huggingface" and "trained" in meta["tokenizer"]["source"]
    assert meta["vocab_size"] == load_tokenizer(tmp_path / "out").vocab_size <= 300
    expected = train_byte_level_bpe(
        [d for d, held in zip(DOCUMENTS, validation_documents(12, 0.2, 0)) if not held], 300
    )
    assert load_tokenizer(tmp_path / "out").encode(DOCUMENTS[0]) == expected.encode(DOCUMENTS[0])


class _FailingTokenizer:
    """Delegates to a real tokenizer and fails on the second batch (an interrupted run)."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.inner.encode_batch(texts)


def test_an_interrupted_run_leaves_nothing_that_looks_finished(tmp_path, tokenizer, monkeypatch):
    import m2rnn_jax.data.text as text

    corpus = Corpus(inputs=(str(_write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)),))
    out = tmp_path / "out"
    prepare_text_data(corpus, out, tokenizer=tokenizer, progress=False)
    monkeypatch.setattr(text, "BATCH_DOCUMENTS", 4)
    with pytest.raises(KeyboardInterrupt):
        prepare_text_data(corpus, out, tokenizer=_FailingTokenizer(tokenizer), progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "meta.json" not in names and "tokenizer.json" not in names  # the old run's meta is gone first
    assert not [n for n in names if n.startswith(".")]  # no temporary files left behind


def test_corpus_errors(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="INPUT: the corpus is empty"):
        prepare_text_data(Corpus(inputs=(str(tmp_path / "empty.txt"),)), tmp_path / "out", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="exactly one of them"):
        Corpus()
    with pytest.raises(ValueError, match=r"--txt-documents: expected one of \('file', 'paragraph'\)"):
        Corpus(inputs=(str(tmp_path / "empty.txt"),), txt_documents="line")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--output: expected a writable directory"):
        prepare_text_data(
            Corpus(inputs=(str(tmp_path / "empty.txt"),)), tmp_path / "a_file" / "out", tokenizer=tokenizer
        )


def test_a_bad_corpus_leaves_an_earlier_output_alone(tmp_path, tokenizer):
    good = Corpus(inputs=(str(_write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)),))
    prepare_text_data(good, tmp_path / "out", tokenizer=tokenizer, progress=False)
    before = (tmp_path / "out" / "meta.json").read_text()
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="--text-field"):
        prepare_text_data(Corpus(inputs=(str(tmp_path / "bad.jsonl"),)), tmp_path / "out", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="--validation-fraction"):
        prepare_text_data(good, tmp_path / "out", tokenizer=tokenizer, validation_fraction=0.0)
    assert (tmp_path / "out" / "meta.json").read_text() == before
