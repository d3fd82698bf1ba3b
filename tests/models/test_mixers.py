"""The mixer registry agrees with ModelConfig, and every registered mixer implements the SequenceMixer interface."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from m2rnn_jax.layers.mixer import SequenceMixer
from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.mixers import MIXER_LETTERS, MIXERS, mixer_fields, mixer_spec
from m2rnn_jax.models.presets import tiny_config

CONSTRUCTOR_KEYWORDS = {"num_layers", "initializer_range", "dtype", "param_dtype", "rngs"}


def test_every_registered_mixer_has_a_model_config_field_of_its_config_type():
    fields = {field.name: field for field in dataclasses.fields(ModelConfig)}
    for spec in MIXERS:
        assert spec.field in fields, spec
        assert spec.config_class.__name__ in str(fields[spec.field].type), spec
    assert len({spec.letter for spec in MIXERS}) == len(MIXERS) == len({spec.field for spec in MIXERS})


@pytest.mark.parametrize("spec", MIXERS, ids=lambda spec: spec.letter)
def test_module_class_implements_the_sequence_mixer_interface(spec):
    cls = spec.module_class
    assert inspect.isfunction(cls.init_state) and inspect.isfunction(cls.__call__)
    call = inspect.signature(cls.__call__).parameters
    assert list(call)[:3] == ["self", "x", "state"] and call["segment_ids"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(cls.init_state).parameters)[:4] == ["self", "batch_size", "max_length", "dtype"]
    init = inspect.signature(cls.__init__).parameters
    assert list(init)[:3] == ["self", "hidden_size", "config"]
    assert CONSTRUCTOR_KEYWORDS <= {name for name, p in init.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_built_mixers_are_sequence_mixers():
    from m2rnn_jax.models.counting import abstract_decoder

    model = abstract_decoder(tiny_config(MIXER_LETTERS))
    for block in model.blocks:
        assert isinstance(block.mixer, SequenceMixer)
        assert isinstance(block.mixer, mixer_spec(block.letter).module_class)


def test_lookup_errors_name_the_argument():
    with pytest.raises(ValueError, match=rf"^letter: expected one of {MIXER_LETTERS}, got 'X'"):
        mixer_spec("X")
    with pytest.raises(ValueError, match="^letter: "):
        mixer_fields("MX")
    assert mixer_fields("MMA") == {"m2rnn", "attention"}
