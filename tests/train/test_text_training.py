"""Text end to end on a tiny corpus: prepare-data -> train (vocab and tokenizer from the data, validation
perplexity and bits per byte logged) -> eval (prints them) -> generate (prints text)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from m2rnn_jax.cli import main
from m2rnn_jax.data.tokenizer import load_tokenizer
from m2rnn_jax.models.presets import register_preset, tiny_config

ONE_LAYER = "test-text-one-m2rnn-layer"  # the cheapest model to compile
SEQ_LEN = 16


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """(run directory, prepared directory, meta) after 4 training steps with validation every 2."""
    register_preset(ONE_LAYER, lambda: tiny_config("M"), "one M2RNN layer (text tests)", overwrite=True)
    root = tmp_path_factory.mktemp("text")
    (root / "corpus.txt").write_text("\n\n".join(f"Story {i}: the cat saw {i % 7} dogs. Fin é." for i in range(40)))
    data, workdir = root / "data", root / "run"
    assert (
        main(
            [
                "prepare-data",
                str(root / "corpus.txt"),
                "--txt-documents",
                "paragraph",
                "--train-tokenizer",
                "300",
                "--validation-fraction",
                "0.25",
                "--output",
                str(data),
                "--quiet",
            ]
        )
        == 0
    )
    train = [
        "train",
        "--preset",
        ONE_LAYER,
        "--workdir",
        str(workdir),
        "--set",
        "data.kind=token_file",
        "--set",
        f"data.path={data}",
        "--set",
        "data.mask_documents=true",
        "--set",
        f"data.seq_len={SEQ_LEN}",
        "--set",
        f"data.eval_lengths=[{SEQ_LEN}]",
        "--set",
        "data.eval_batch_size=4",
        "--set",
        "steps=4",
        "--set",
        "eval_every=2",
        "--set",
        "batch_size=4",
        "--set",
        "optimizer.warmup_steps=1",
        "--set",
        'sample.prompts=["the cat saw", "Story 3"]',
        "--set",
        "sample.max_new_tokens=5",
    ]
    assert main(train) == 0
    return workdir, data, json.loads((data / "meta.json").read_text())


def _expected_bytes(data, meta, windows: int) -> int:
    """UTF-8 bytes of the targets of the first ``windows`` validation windows."""
    tokens = np.fromfile(data / "validation.bin", dtype=meta["dtype"]).astype(np.int64)
    targets = np.concatenate([tokens[k * SEQ_LEN + 1 : (k + 1) * SEQ_LEN + 1] for k in range(windows)])
    return int(load_tokenizer(data).token_byte_lengths()[targets].sum())


def test_the_run_takes_vocabulary_eos_and_tokenizer_from_the_data(text_run):
    workdir, data, meta = text_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["vocab_size"] == meta["vocab_size"] != tiny_config("M").vocab_size
    assert config["data"]["eos_token_id"] == meta["eos_token_id"] and config["data"]["token_dtype"] == meta["dtype"]
    assert (workdir / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()


def test_validation_perplexity_and_bits_per_byte_are_logged(text_run):
    workdir, data, meta = text_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == f"eval_len{SEQ_LEN}"]
    assert [r["step"] for r in evals] == [2, 4]
    windows = (meta["splits"]["validation"]["tokens"] - 1) // SEQ_LEN  # the whole split (< data.eval_windows)
    expected_bytes = _expected_bytes(data, meta, windows)
    for record in evals:
        assert record["tokens"] == windows * SEQ_LEN
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)
        nats = record["loss"] * record["tokens"]
        assert record["bits_per_byte"] == pytest.approx(nats / (math.log(2) * expected_bytes), rel=1e-5)
    assert evals[1]["loss"] < evals[0]["loss"] < math.log(meta["vocab_size"]) + 0.5
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_prints_perplexity_and_bits_per_byte(text_run, capsys, tmp_path):
    workdir, data, meta = text_run
    last = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"perplexity={last['perplexity']:.3f} bits_per_byte={last['bits_per_byte']:.4f}" in out
    # One plain token file, evaluated whole, with the bytes of the workdir's tokenizer.
    shutil.copy(data / "validation.bin", tmp_path / "held_out.bin")
    assert main(["eval", "--workdir", str(workdir), "--data", str(tmp_path / "held_out.bin")]) == 0
    assert f"bits_per_byte={last['bits_per_byte']:.4f} tokens={last['tokens']}" in capsys.readouterr().out
    assert main(["eval", "--workdir", str(workdir), "--data", str(tmp_path / "nothing")]) == 2
    assert "--data: expected a prepare-data directory or a token file" in capsys.readouterr().err


def test_generate_prints_text_for_prompts_of_different_lengths(text_run, capsys):
    workdir, _, _ = text_run
    argv = [
        "generate",
        "--checkpoint",
        str(workdir),
        "--prompt",
        "Story 3: the",
        "--prompt",
        "é",
        "--max-new-tokens",
        "5",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    first, second = out.split("=== prompt 2 ===\n")
    assert first.startswith("=== prompt 1 ===\nStory 3: the") and second.startswith("é")
    assert main(argv[:3] + ["--prompt-ids", "1,2", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 3


def test_text_errors(text_run, capsys, tmp_path):
    workdir, data, meta = text_run
    too_small = [
        "train",
        "--preset",
        ONE_LAYER,
        "--workdir",
        str(tmp_path / "run"),
        "--set",
        "data.kind=token_file",
        "--set",
        f"data.path={data}",
        "--set",
        "model.vocab_size=260",
    ]
    assert main(too_small) == 2
    assert (
        f"model.vocab_size: expected >= {meta['vocab_size']} (the vocabulary of data.path '{data}'), got 260"
        in capsys.readouterr().err
    )
    assert main(["generate", "--preset", ONE_LAYER, "--prompt", "hi"]) == 2
    assert "error: --tokenizer: expected --tokenizer PATH" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    argv = ["generate", "--checkpoint", str(workdir), "--tokenizer", str(tmp_path / "empty"), "--prompt", "x"]
    assert main(argv) == 2
    assert "tokenizer: expected tokenizer.json or tokenizer.tiktoken" in capsys.readouterr().err


def test_continuations_stop_at_eos_and_drop_ids_the_tokenizer_lacks():
    from m2rnn_jax.models.text_generation import until_eos as _until_eos

    assert _until_eos(np.array([5, 300, 7, 0, 9]), eos_token_id=0, vocab_size=290) == [5, 7]
    assert _until_eos(np.array([5, 6]), eos_token_id=0, vocab_size=290) == [5, 6]


def test_the_run_ends_with_a_sample_for_each_prompt(text_run):
    workdir, _, _ = text_run
    samples = (workdir / "samples.txt").read_text()
    assert samples.count("--- sample ") == 2 and "(step 4)" in samples
    first, second = samples.split("--- sample 2 (step 4) ---\n")
    assert first.split("---\n", 1)[1].startswith("the cat saw") and second.startswith("Story 3")
