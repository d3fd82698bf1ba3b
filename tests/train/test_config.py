"""Config files, --set overrides and presets: round trips and errors that name the key."""

from __future__ import annotations

import json
import re

import pytest

from m2rnn_jax.models import list_presets
from m2rnn_jax.train.config import TrainConfig, load_config_file
from m2rnn_jax.train.overrides import apply_overrides, merge, parse_value
from m2rnn_jax.train.presets import list_train_presets, train_config


def test_state_tracking_presets_exist_for_every_group_and_show_up_as_model_presets():
    names = list_train_presets()
    for group in ("parity", "s3", "s5", "a5"):
        assert f"state-tracking-{group}-tiny" in names
        assert f"state-tracking-{group}-tiny" in list_presets()
    config = train_config("state-tracking-a5-tiny")
    assert config.model.vocab_size == 60 and config.data.group == "a5"
    assert config.data.eval_lengths == (64, 256, 1024) and config.data.seq_len == 64


@pytest.mark.parametrize("size", ["tiny", "small", "large"])
def test_state_tracking_presets_draw_a_random_state_weight_of_spectral_radius_1_6(size):
    m2rnn = train_config(f"state-tracking-a5-{size}").model.m2rnn
    assert m2rnn.state_weight_init_std == pytest.approx(1.6 / m2rnn.v_head_dim**0.5)
    if m2rnn.v_head_dim == 64:
        assert m2rnn.state_weight_init_std == 0.2


@pytest.mark.parametrize("group", ["a5", "s5"])
def test_large_state_tracking_presets_read_the_state_with_a_learned_query(group):
    # SEARCH.md row 23: with the token's query the decoder stays on A5's lookup plateau, with a learned one it leaves
    config = train_config(f"state-tracking-{group}-large")
    assert config.model.m2rnn.query == "learned" and config.model.m2rnn.backend == "scan"
    assert config.data.curriculum == ((0, 4), (10000, 8), (13000, 16), (14000, 64)) and config.steps == 16000
    assert config.data.eval_lengths == (64, 256, 1024)  # 256: 4x the last training length


def test_model_presets_train_on_random_tokens_by_default():
    config = train_config("tiny-hybrid")
    assert config.data.kind == "random_tokens" and config.model.layer_pattern == "MGSARU"


def test_to_dict_from_dict_round_trip_through_json():
    config = train_config("state-tracking-s3-tiny")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_overrides_are_typed_and_applied_together():
    config = train_config("state-tracking-s3-tiny")
    changed = apply_overrides(
        config,
        [
            "steps=20",
            "optimizer.warmup_steps=5",
            "optimizer.learning_rate=1e-3",
            "data.eval_lengths=[8, 16]",
            "model.m2rnn.num_heads=8",
            "model.m2rnn.num_q_heads=8",
            "model.m2rnn.num_k_heads=8",
        ],
    )
    assert changed.steps == 20 and changed.optimizer.warmup_steps == 5  # order-independent validation
    assert changed.optimizer.learning_rate == 1e-3 and isinstance(changed.optimizer.learning_rate, float)
    assert changed.data.eval_lengths == (8, 16)
    assert changed.model.m2rnn.num_heads == 8 and changed.model.m2rnn.num_v_heads == 8  # derived counts follow
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("null") is None


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("optimizer.lr=1", "optimizer: unknown key 'lr'; valid keys: learning_rate, b1"),
        ("optimizer.learnin_rate=1", "optimizer: unknown key 'learnin_rate' (did you mean 'learning_rate'?)"),
        ("stepz=3", "config: unknown key 'stepz' (did you mean 'steps'?)"),
        ("steps=abc", "steps: expected int, got 'abc'"),
        ("data.kind=video", "data.kind: expected one of"),
        ("model.m2rnn.num_q_heads=3", "model.m2rnn: num_q_heads: expected a divisor of num_heads"),
        ("model.attention.num_heads=2", "model.attention: this section is not set"),
        ("batch_size=30", "batch_size: expected a multiple of grad_accum_steps"),
        ("model.vocab_size=4", "model.vocab_size: expected >= 6"),
        ("optimizer.decay_steps=2950", "optimizer.decay_steps: expected None or <= steps - warmup_steps = 2900"),
        ("no_equals_sign", "--set: expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(assignment, message):
    config = train_config("state-tracking-s3-tiny")
    if assignment.startswith("batch_size"):
        config = merge(config, {"grad_accum_steps": 4})
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(config, [assignment])


def test_config_files_in_yaml_and_json(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("preset: state-tracking-s3-tiny\nsteps: 7\noptimizer:\n  warmup_steps: 2\n")
    data = load_config_file(yaml_path)
    assert data == {"preset": "state-tracking-s3-tiny", "steps": 7, "optimizer": {"warmup_steps": 2}}
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps(train_config("state-tracking-parity-tiny").to_dict()))
    assert TrainConfig.from_dict(load_config_file(json_path)).data.group == "parity"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config_file(tmp_path / "list.yaml")
