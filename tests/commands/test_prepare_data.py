"""``m2rnn-jax prepare-data`` through the CLI: outputs, the tokenizer choices, and every error it reports."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from m2rnn_jax.cli import main
from m2rnn_jax.data.tokenizer import load_tokenizer

PARAGRAPHS = [f"Paragraph {i} about {'cats' if i % 2 else 'dogs'} and other things. Ça va? 🙂" for i in range(10)]
ERROR = "m2rnn-jax prepare-data: error: "


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(PARAGRAPHS[:5]))
    (tmp_path / "b.txt").write_text("\n\n".join(PARAGRAPHS[5:]))
    return tmp_path


def _prepare(capsys, *argv):
    code = main(["prepare-data", *argv, "--quiet"])
    return code, capsys.readouterr()


def test_paragraph_documents_with_a_trained_tokenizer(corpus, capsys):
    out = corpus / "out"
    code, captured = _prepare(
        capsys,
        str(corpus / "*.txt"),
        "--txt-documents",
        "paragraph",
        "--train-tokenizer",
        "300",
        "--validation-fraction",
        "0.2",
        "--output",
        str(out),
    )
    assert code == 0, captured.err
    assert "train: 8 documents" in captured.out and "validation: 2 documents" in captured.out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    tokenizer = load_tokenizer(out)
    train = tokenizer.decode(np.fromfile(out / "train.bin", dtype=meta["dtype"]))
    validation = tokenizer.decode(np.fromfile(out / "validation.bin", dtype=meta["dtype"]))
    eos = tokenizer.decode([meta["eos_token_id"]])
    assert sorted((train + validation).split(eos)[:-1] + [""]) == sorted(PARAGRAPHS + [""])


def test_an_existing_tokenizer_file_or_directory(corpus, capsys):
    first = _prepare(capsys, str(corpus / "*.txt"), "--train-tokenizer", "280", "--output", str(corpus / "first"))
    assert first[0] == 0, first[1].err
    code, captured = _prepare(
        capsys,
        str(corpus / "b.txt"),
        "--txt-documents",
        "paragraph",
        "--tokenizer",
        str(corpus / "first"),
        "--output",
        str(corpus / "second"),
    )
    assert code == 0, captured.err
    meta = json.loads((corpus / "second" / "meta.json").read_text())
    assert meta["tokenizer"]["source"] == str(corpus / "first")
    assert (corpus / "second" / "tokenizer.json").read_text() == (corpus / "first" / "tokenizer.json").read_text()


def test_a_tiktoken_file(corpus, capsys):
    ranks = {bytes([i]): i for i in range(256)} | {b"ca": 256, b"cat": 257}
    path = corpus / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    code, captured = _prepare(
        capsys,
        str(corpus / "*.txt"),
        "--txt-documents",
        "paragraph",
        "--tokenizer",
        str(path),
        "--output",
        str(corpus / "out"),
    )
    assert code == 0, captured.err
    meta = json.loads((corpus / "out" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "tiktoken" and meta["eos_token_id"] == 258 and meta["vocab_size"] == 259
    assert meta["tokenizer"]["files"] == ["tokenizer.tiktoken", "tiktoken_config.json"]
    tokens = np.fromfile(corpus / "out" / "train.bin", dtype=np.uint16)
    assert 257 in tokens  # "cat" merged
    assert load_tokenizer(corpus / "out").decode(tokens).count("<|endoftext|>") == meta["splits"]["train"]["documents"]


def test_jsonl_with_a_text_field(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": p}) + "\n" for p in PARAGRAPHS))
    code, captured = _prepare(
        capsys, str(path), "--text-field", "body", "--train-tokenizer", "300", "--output", str(tmp_path / "out")
    )
    assert code == 0, captured.err
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["validation"]["documents"] == 1


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d: [str(d / "*.md"), "--train-tokenizer", "300"], "INPUT: no files matched '{d}/*.md'"),
        (lambda d: [str(d / "empty.txt"), "--train-tokenizer", "300"], "INPUT: the corpus is empty"),
        (
            lambda d: [str(d / "rows.jsonl"), "--train-tokenizer", "300"],
            "--text-field: expected a field 'text' in '{d}/rows.jsonl' line 1, got the fields ['body']",
        ),
        (lambda d: [str(d / "latin1.txt"), "--train-tokenizer", "300"], "INPUT: cannot read '{d}/latin1.txt'"),
        (
            lambda d: [str(d / "a.txt"), "--train-tokenizer", "200"],
            "--train-tokenizer: expected a vocabulary of at least 257 (256 bytes + EOS), got 200",
        ),
        (lambda d: [str(d / "a.txt"), "--tokenizer", str(d / "none.json")], "tokenizer: expected a tokenizer.json"),
        (lambda d: ["--train-tokenizer", "300"], "INPUT: expected input files or --hf-dataset"),
    ],
)
def test_errors_exit_2_with_a_message(tmp_path, capsys, make_argv, message):
    (tmp_path / "a.txt").write_text("\n\n".join(PARAGRAPHS))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    code, captured = _prepare(capsys, *make_argv(tmp_path), "--output", str(tmp_path / "out"))
    assert code == 2
    assert captured.err.startswith(ERROR) and message.format(d=tmp_path) in captured.err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_an_output_that_is_not_a_writable_directory(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n\n".join(PARAGRAPHS))
    (tmp_path / "taken").write_text("a file")
    code, captured = _prepare(
        capsys, str(tmp_path / "a.txt"), "--train-tokenizer", "300", "--output", str(tmp_path / "taken")
    )
    assert code == 2 and f"{ERROR}--output: expected a writable directory, got '{tmp_path}/taken'" in captured.err


def test_prepare_data_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "prepare-data" in capsys.readouterr().out
