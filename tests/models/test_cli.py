"""``m2rnn-jax info`` and ``m2rnn-jax generate`` through the CLI dispatcher."""

from __future__ import annotations

import json

import pytest

from m2rnn_jax.cli import main
from m2rnn_jax.models import presets
from m2rnn_jax.models.presets import list_presets, register_preset, tiny_config

# One M2RNN layer: the cheapest model to compile for the generate command.
SMALLEST = "test-cli-one-m2rnn-layer"


@pytest.fixture(scope="module", autouse=True)
def smallest_preset():
    register_preset(SMALLEST, lambda: tiny_config("M"), "one M2RNN layer (CLI tests)", overwrite=True)
    yield
    del presets._REGISTRY[SMALLEST]


def test_info_json_has_the_sizes(capsys):
    assert main(["info", "--preset", "tiny-hybrid", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_non_embedding", "layer_pattern", "recurrent_state_per_layer"):
        assert key in info
    assert info["layer_pattern"] == "MGSARU"
    assert set(info["recurrent_state_per_layer"]) == {"m2rnn", "gated_deltanet", "mamba2", "rnn", "gru"}
    assert info["recurrent_state_per_layer"]["m2rnn"] == 4 * 16 * 8
    assert info["params_total"] > info["params_non_embedding"] > 0


def test_info_text_output(capsys):
    assert main(["info", "--preset", "tiny-m2rnn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-m2rnn: ") and "params_total" in out


def test_info_list_prints_one_preset_per_line_name_first(capsys):
    assert main(["info", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert all(len(line.split()) > 1 for line in lines)
    assert "hybrid-gdn-m2rnn-5l-7b" in list_presets()


def test_info_unknown_preset_is_a_clear_error(capsys):
    assert main(["info", "--preset", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2rnn-jax info: error: --preset: expected a preset name (m2rnn-jax info --list")
    assert all(name in err for name in list_presets()) and err.rstrip().endswith("got 'no-such-model'")


def test_generate_prints_the_new_tokens(capsys):
    argv = ["generate", "--preset", SMALLEST, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    tokens = [int(token) for token in captured.out.strip().split(",")]
    assert len(tokens) == 4 and all(0 <= token < 256 for token in tokens)
    assert "randomly initialised" in captured.err
    assert main(argv + ["--temperature", "0.8", "--top-k", "5", "--seed", "3"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 4


def test_generate_rejects_out_of_vocabulary_prompts(capsys):
    assert main(["generate", "--preset", SMALLEST, "--prompt-ids", "1,999", "--max-new-tokens", "2"]) == 2
    assert "m2rnn-jax generate: error: --prompt-ids: expected ids in [0, 256), got [1, 999]" in capsys.readouterr().err


def test_generate_from_a_training_checkpoint(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train = ["train", "--preset", SMALLEST, "--workdir", workdir, "--set", "steps=2", "--set",
             "optimizer.warmup_steps=1", "--set", "data.seq_len=8", "--set", "batch_size=2", "--set",
             "data.eval_lengths=[8]"]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    argv = ["generate", "--checkpoint", workdir, "--prompt-ids", "4,5", "--max-new-tokens", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "loaded step 2" in captured.err
    assert len(captured.out.strip().split(",")) == 3
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "4"]) == 2
    assert "config.json" in capsys.readouterr().err
