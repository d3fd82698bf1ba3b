"""Opt-in value checks (``check_values=True`` / ``M2RNN_JAX_CHECKS=1``): each failure names the argument, the value
and its index, eagerly and under jit, grad and vmap; valid inputs pass unchanged; off by default (same program)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax import m2rnn
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig
from m2rnn_jax.models.decoder import Decoder
from m2rnn_jax.models.presets import tiny_config
from m2rnn_jax.testing import random_m2rnn_inputs
from m2rnn_jax.train.batch_checks import check_batch
from m2rnn_jax.train.state import model_graphdef
from m2rnn_jax.train.step import make_eval_step
from m2rnn_jax.value_checks import ENV_VAR, checks_enabled

checked = jax.jit(functools.partial(m2rnn, check_values=True))  # one compile per input structure for the module


@pytest.fixture(scope="module")
def dense():
    return random_m2rnn_inputs(jax.random.key(0), batch=2, seq_len=4, num_heads=2, k_dim=3, v_dim=2)


@pytest.fixture(scope="module")
def packed():
    return random_m2rnn_inputs(
        jax.random.key(1), batch=0, seq_len=0, num_heads=2, k_dim=2, v_dim=2, cu_seqlens=[0, 2, 3, 5]
    )


@pytest.fixture(autouse=True)
def _no_env_checks(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _with(inputs: dict, name: str, index: tuple[int, ...], value: float) -> dict:
    return {**inputs, name: inputs[name].at[index].set(value)}


def _raises_under_jit(message: str):
    """Under jit the callback's error arrives as jax.errors.JaxRuntimeError whose text ends with the message."""
    return pytest.raises(jax.errors.JaxRuntimeError, match=re.escape(message))


BAD_VALUES = [
    ("f", (0, 3, 1), 2.0, "f: expected values in (0, 1], got 2.0 at index (0, 3, 1)"),
    ("f", (1, 0, 0), 0.0, "f: expected values in (0, 1], got 0.0 at index (1, 0, 0)"),
    ("f", (0, 2, 1), -0.5, "f: expected values in (0, 1], got -0.5 at index (0, 2, 1)"),
    ("f", (1, 1, 0), np.nan, "f: expected values in (0, 1], got nan at index (1, 1, 0)"),
    ("q", (0, 1, 0, 2), np.nan, "q: expected finite values, got nan at index (0, 1, 0, 2)"),
    ("k", (1, 3, 1, 0), np.inf, "k: expected finite values, got inf at index (1, 3, 1, 0)"),
    ("v", (0, 0, 1, 1), -np.inf, "v: expected finite values, got -inf at index (0, 0, 1, 1)"),
    ("W", (1, 0, 1), np.nan, "W: expected finite values, got nan at index (1, 0, 1)"),
    ("h0", (1, 1, 2, 0), np.inf, "h0: expected finite values, got inf at index (1, 1, 2, 0)"),
]


@pytest.mark.parametrize("name, index, value, message", BAD_VALUES)
def test_bad_value_raises_under_jit(dense, name, index, value, message):
    with _raises_under_jit(message):
        jax.block_until_ready(checked(**_with(dense, name, index, value)))


@pytest.mark.parametrize("name, index, value, message", BAD_VALUES[:5:4])  # f and q; jit covers all
def test_bad_value_raises_eagerly_as_value_error(dense, name, index, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        m2rnn(**_with(dense, name, index, value), check_values=True)


def test_the_first_bad_element_is_named(dense):
    f = dense["f"].at[1, 2, 0].set(3.0).at[0, 1, 1].set(5.0)  # row-major: (0, 1, 1) comes first
    with _raises_under_jit("f: expected values in (0, 1], got 5.0 at index (0, 1, 1)"):
        jax.block_until_ready(checked(**{**dense, "f": f}))


@pytest.mark.parametrize(
    "offsets, message",
    [
        ([0, 3, 2, 5], "cu_seqlens: expected non-decreasing offsets, got 2 at index (2,)"),
        ([1, 2, 3, 5], "cu_seqlens: expected 0 first, got 1 at index (0,)"),
        ([0, 2, 3, 4], "cu_seqlens: expected the number of packed tokens T = 5 last, got 4 at index (3,)"),
    ],
)
def test_bad_cu_seqlens_raises_under_jit(packed, offsets, message):
    with _raises_under_jit(message):
        jax.block_until_ready(checked(**{**packed, "cu_seqlens": jnp.asarray(offsets, jnp.int32)}))


def test_decreasing_cu_seqlens_passes_silently_under_jit_without_checks(packed):
    """What ``help(m2rnn)`` warns about: without the checks nothing looks at traced offsets (scan: the kernels
    might read out of bounds)."""
    unchecked = jax.jit(functools.partial(m2rnn, backend="scan"))
    y, h = unchecked(**{**packed, "cu_seqlens": jnp.asarray([0, 3, 2, 5], jnp.int32)})
    assert y.shape == packed["q"].shape[:2] + (2,) and h.shape == packed["h0"].shape


def test_valid_inputs_pass_with_unchanged_results(dense, packed):
    for inputs in (dense, packed):
        expected = jax.jit(m2rnn)(**inputs)
        for a, b in zip(checked(**inputs), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m2rnn(**dense, check_values=True)  # eager: no error


def _loss(f, inputs, check_values):
    y, h = m2rnn(**{**inputs, "f": f}, check_values=check_values)
    return jnp.sum(y * y) + jnp.sum(h)


def test_gradients_unchanged_and_bad_values_caught_under_grad(dense):
    grad = jax.jit(jax.grad(_loss), static_argnums=2)
    np.testing.assert_array_equal(np.asarray(grad(dense["f"], dense, True)), np.asarray(grad(dense["f"], dense, False)))
    with _raises_under_jit("f: expected values in (0, 1], got 1.5 at index (1, 2, 0)"):
        jax.block_until_ready(grad(dense["f"].at[1, 2, 0].set(1.5), dense, True))


def test_bad_values_caught_under_vmap(dense):
    fs = jnp.stack([dense["f"], dense["f"].at[0, 1, 1].set(0.0)])
    batched = jax.jit(jax.vmap(lambda f: m2rnn(**{**dense, "f": f}, check_values=True)))
    with _raises_under_jit("f: expected values in (0, 1], got 0.0 at index (0, 1, 1)"):
        jax.block_until_ready(batched(fs))


def _program(inputs, **kwargs) -> tuple[str, str]:
    fn = functools.partial(m2rnn, **kwargs)
    return str(jax.make_jaxpr(fn)(**inputs)), jax.jit(fn).lower(**inputs).as_text()


def _has_checks(program: tuple[str, str]) -> bool:
    jaxpr, hlo = program
    return "debug_callback" in jaxpr and "callback" in hlo


def test_checks_are_off_by_default_and_add_nothing_to_the_program(dense):
    default, off = _program(dense), _program(dense, check_values=False)
    assert default == off
    assert "callback" not in default[0] + default[1]
    assert _has_checks(_program(dense, check_values=True))


def test_environment_variable_turns_checks_on(dense, monkeypatch):
    bad = _with(dense, "f", (0, 0, 0), 2.0)
    monkeypatch.setenv(ENV_VAR, "1")
    fresh = jax.jit(lambda **inputs: m2rnn(**inputs))  # jax.jit(m2rnn) may reuse a trace made without the variable
    with _raises_under_jit("f: expected values in (0, 1], got 2.0 at index (0, 0, 0)"):
        jax.block_until_ready(fresh(**bad))
    jax.block_until_ready(jax.jit(functools.partial(m2rnn, check_values=False))(**bad))  # the argument wins
    assert _has_checks(_program(dense))
    monkeypatch.setenv(ENV_VAR, "0")
    assert _program(dense) == _program(dense, check_values=False)


def test_bad_switch_values_are_rejected(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match=re.escape("M2RNN_JAX_CHECKS: expected 0 or 1 (or unset), got 'yes'")):
        checks_enabled(None)
    with pytest.raises(ValueError, match=re.escape("check_values: expected True, False or None, got 1")):
        checks_enabled(1)


def test_layer_passes_the_flag_to_the_op():
    config = M2RNNConfig(num_heads=2, k_head_dim=4, v_head_dim=4, kernel_size=None, activation_function=None)
    layer = M2RNN(8, config, num_layers=1, check_values=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 3, 8)).at[0, 1, 2].set(jnp.nan)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"q: expected finite values, got nan at index \(0, 1, "):
        jax.block_until_ready(nnx.jit(lambda m, x: m(x)[0])(layer, x))


def test_batch_check_names_an_out_of_vocabulary_token():
    inputs = jnp.zeros((2, 5), jnp.int32)
    batch = {"inputs": inputs.at[1, 2].set(16), "targets": inputs, "segment_ids": inputs}
    with pytest.raises(ValueError, match=re.escape("inputs: expected token ids in [0, 16), got 16 at index (1, 2)")):
        check_batch(batch, 16, check_values=True)
    check_batch(batch, 16)  # off by default
    with _raises_under_jit("targets: expected token ids in [0, 16), got -1 at index (0, 4)"):
        jax.jit(lambda b: check_batch(b, 16, check_values=True))(
            {**batch, "inputs": inputs, "targets": inputs.at[0, 4].set(-1)}
        )


def test_batch_check_names_malformed_segment_ids():
    tokens = jnp.zeros((2, 5), jnp.int32)
    segments = jnp.asarray([[0, 0, 1, 1, 2], [0, 1, 1, 0, 0]], jnp.int32)
    with pytest.raises(
        ValueError,
        match=re.escape("segment_ids: expected document ids non-decreasing along each row, got 0 at index (1, 3)"),
    ):
        check_batch({"inputs": tokens, "targets": tokens, "segment_ids": segments}, 16, check_values=True)
    with pytest.raises(
        ValueError, match=re.escape("segment_ids: expected non-negative document ids, got -1 at index (0, 0)")
    ):
        check_batch(
            {"inputs": tokens, "targets": tokens, "segment_ids": segments.at[0, 0].set(-1)}, 16, check_values=True
        )


def test_steps_check_their_batch_when_the_variable_is_set(monkeypatch):
    """The train and eval steps share ``step._forward``, which calls the batch check; an attention-only model has no
    op checks, so a callback in its traced step is the batch check (the failure itself: the tests above)."""
    config = tiny_config("A", vocab_size=16, hidden_size=16)
    graphdef = model_graphdef(config)
    params = jax.eval_shape(lambda: nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)[1])
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens}

    def traced() -> str:
        return str(jax.make_jaxpr(make_eval_step(graphdef))(params, batch))

    assert "callback" not in traced()
    monkeypatch.setenv(ENV_VAR, "1")
    assert "debug_callback" in traced()
