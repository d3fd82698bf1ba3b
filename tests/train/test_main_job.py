"""The README's main job learns S3 and generalizes to 4x its training length (slow: ~3 min on 2 cores).

Run with ``python -m pytest -m slow tests/train/test_main_job.py``. Same preset and code path as
``m2rnn-jax train --preset state-tracking-s3-tiny``; only the 1024-length evaluation is left out to save time.
"""

from __future__ import annotations

import json

import pytest

from m2rnn_jax.train.overrides import apply_overrides
from m2rnn_jax.train.presets import train_config
from m2rnn_jax.train.trainer import Trainer


@pytest.mark.slow
def test_s3_tiny_reaches_99_percent_at_four_times_the_training_length(tmp_path):
    config = apply_overrides(train_config("state-tracking-s3-tiny"), ["data.eval_lengths=[64, 256]"])
    Trainer(config, tmp_path).run()
    results = json.loads((tmp_path / "length_generalization.json").read_text())["results"]
    assert config.data.seq_len == 64
    assert results["256"]["accuracy"] >= 0.99, results


@pytest.mark.slow
def test_text_demo_validation_perplexity_falls_and_ends_with_samples(tmp_path, monkeypatch):
    """``m2rnn-jax train --preset text-demo`` (the README's real-text command), through the CLI."""
    from m2rnn_jax.cli import main

    monkeypatch.setenv("M2RNN_JAX_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--preset", "text-demo", "--workdir", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    perplexities = [r["perplexity"] for r in records if r["kind"] == "eval_len128"]
    assert len(perplexities) == 4 and perplexities[-1] < 0.5 * perplexities[0], perplexities
    assert (tmp_path / "run" / "samples.txt").read_text().count("--- sample ") == 2
