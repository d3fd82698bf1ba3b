"""The custom-VJP short conv (``causal_conv``) against autodiff of the plain formula (``causal_conv_reference``).

Values, the returned state and every gradient (x, state, kernel, bias) for kernel sizes 1..4, with and without
bias and activation, float64 / float32 / bf16 compute with float32 parameters, under ``jax.jit`` and ``jax.vmap``,
through the layer with a state given and None, and the decoding step (S = 1 with a state). ``causal_conv``'s
"auto" backend is the "jnp" custom VJP here and the fused kernels on an NVIDIA GPU (float64 stays on "jnp"), so on
the GPU box these tests check the kernels too (tests/kernels/test_causal_conv_gpu.py checks them everywhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers import CausalDepthwiseConv1d
from m2rnn_jax.layers.conv import causal_conv, causal_conv_reference
from m2rnn_jax.testing import jaxpr_equations

# (x dtype, state dtype, parameter dtype, compute/output dtype)
MODES = {
    "f64": (jnp.float64, jnp.float64, jnp.float64, jnp.float64),
    "f32": (jnp.float32, jnp.float32, jnp.float32, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
}
# tolerance of values that pass through x's dtype (y, new state, dx, d state) and of the float32 parameter
# gradients (reductions over (B, S) in the compute dtype); bf16: the reference adds the two state cotangents in bf16,
# and its parameter gradients reduce bf16 products, in an order XLA picks per platform (equal to 1e-6 on the CPU,
# 8e-3 apart on gradients of magnitude ~20 on the H200, 2026-12-04): held to bf16's precision, relative to the
# largest
TOLERANCE = {"f64": (1e-12, 1e-12), "f32": (1e-6, 1e-6), "bf16": (2**-7, 2**-7)}
PARAMETER_GRADIENTS = ("dkernel", "dbias")


def assert_close(actual: jax.Array, expected: jax.Array, name: str, mode: str) -> None:
    """Equal dtypes and shapes, values within the mode's tolerance (relative, and relative to the largest)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    tol = TOLERANCE[mode][name in PARAMETER_GRADIENTS]
    expected, actual = np.asarray(expected).astype(np.float64), np.asarray(actual).astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def assert_results_match(results, expected_results, mode: str) -> None:
    """((y, new_state), gradients of (x, state, kernel, bias)) of a conv against the reference's, per ``mode``'s
    tolerance; a gradient the reference has as None (no bias) must be None too."""
    (outputs, grads), (expected_outputs, expected_grads) = results, expected_results
    for name, actual, expected in zip(("y", "new_state"), outputs, expected_outputs, strict=True):
        assert_close(actual, expected, name, mode)
    for name, actual, expected in zip(("dx", "dstate", *PARAMETER_GRADIENTS), grads, expected_grads, strict=True):
        if expected is None:
            assert actual is None, name
        else:
            assert_close(actual, expected, name, mode)


def make_inputs(mode: str, batch: int, seq_len: int, channels: int, kernel_size: int, use_bias: bool, key: int = 0):
    """Random (x, state, kernel, bias) in the mode's dtypes (NumPy draws: no compilation per shape)."""
    x_dtype, state_dtype, param_dtype, _ = MODES[mode]
    rng = np.random.default_rng(key)
    x = jnp.asarray(rng.standard_normal((batch, seq_len, channels)), x_dtype)
    state = jnp.asarray(rng.standard_normal((batch, kernel_size - 1, channels)), state_dtype)
    kernel = jnp.asarray(0.5 * rng.standard_normal((kernel_size, channels)), param_dtype)
    bias = jnp.asarray(0.3 * rng.standard_normal(channels), param_dtype) if use_bias else None
    return x, state, kernel, bias


def values_and_gradients(conv_fn, x, state, kernel, bias, *, activation, dtype, key: int = 7):
    """(y, new_state) and the cotangents of (x, state, kernel, bias) for fixed random output cotangents."""

    def run(x, state, kernel, bias):
        return conv_fn(x, state, kernel, bias, activation=activation, dtype=dtype)

    (y, new_state), vjp = jax.vjp(run, x, state, kernel, bias)
    rng = np.random.default_rng(key)
    dy = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
    dstate = jnp.asarray(rng.standard_normal(new_state.shape), new_state.dtype)
    return (y, new_state), vjp((dy, dstate))


def check_against_reference(mode, x, state, kernel, bias, activation, transform=lambda f: f) -> None:
    """Both functions under ``jax.jit(transform(...))``: outputs and cotangents agree within the mode's tolerance."""
    dtype = MODES[mode][3]
    run = jax.jit(transform(lambda *args: values_and_gradients(causal_conv, *args, activation=activation, dtype=dtype)))
    run_reference = jax.jit(
        transform(lambda *args: values_and_gradients(causal_conv_reference, *args, activation=activation, dtype=dtype))
    )
    (outputs, grads), (expected_outputs, expected_grads) = (
        run(x, state, kernel, bias),
        run_reference(x, state, kernel, bias),
    )
    assert_results_match((outputs, grads), (expected_outputs, expected_grads), mode)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "kernel_size, use_bias, activation",
    [(1, True, "silu"), (2, False, "silu"), (3, True, None), (4, True, "silu"), (4, False, None)],
)
def test_values_and_gradients_match_reference_under_jit(x64, mode, kernel_size, use_bias, activation):
    x, state, kernel, bias = make_inputs(mode, 2, 7, 5, kernel_size, use_bias)
    check_against_reference(mode, x, state, kernel, bias, activation)


@pytest.mark.parametrize("seq_len", [1, 2, 3])
def test_sequences_shorter_than_the_state(x64, seq_len):
    """S <= kernel_size - 1 (the decoding step is S = 1): the state reaches every output and the new state."""
    x, state, kernel, bias = make_inputs("f64", 2, seq_len, 3, 4, True, key=seq_len)
    check_against_reference("f64", x, state, kernel, bias, "silu")


def test_under_vmap(x64):
    """An extra leading axis mapped by jax.vmap (values and gradients, parameters shared)."""
    xs, states = [], []
    for key in range(3):
        x, state, kernel, bias = make_inputs("f64", 2, 6, 4, 4, True, key=key)
        xs.append(x)
        states.append(state)
    x, state = jnp.stack(xs), jnp.stack(states)

    def batched(run):
        return jax.vmap(run, in_axes=(0, 0, None, None))

    check_against_reference("f64", x, state, kernel, bias, "silu", transform=batched)


@pytest.mark.parametrize("mode, barriers", [("bf16", [(jnp.bfloat16, (2, 7, 5))]), ("f32", []), ("f64", [])])
def test_narrowed_output_cotangent_is_materialized_in_its_dtype(x64, mode, barriers):
    """The backward's one activation-sized intermediate (the pre-activation's cotangent) goes through an
    optimization barrier in the narrow dtype when the layer's output is narrower than its compute dtype (bf16): the
    GPU compiler would otherwise drop the rounding and write it in float32. Nothing is added otherwise."""
    x, state, kernel, bias = make_inputs(mode, 2, 7, 5, 4, True)
    dtype = MODES[mode][3]
    jaxpr = jax.make_jaxpr(lambda *args: values_and_gradients(causal_conv, *args, activation="silu", dtype=dtype))(
        x, state, kernel, bias
    )

    operands = jaxpr_equations(jaxpr.jaxpr, "optimization_barrier")
    assert [(v.aval.dtype, v.aval.shape) for eqn in operands for v in eqn.invars] == barriers


def make_layer(mode: str, kernel_size: int, use_bias: bool) -> CausalDepthwiseConv1d:
    _, _, param_dtype, dtype = MODES[mode]
    conv = CausalDepthwiseConv1d(
        6, kernel_size, use_bias=use_bias, initializer_range=0.5, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(3)
    )
    if use_bias:
        conv.bias[...] = jnp.asarray(0.3 * np.random.default_rng(9).standard_normal(6), param_dtype)
    return conv


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("given_state", [False, True])
def test_layer_gradients_with_and_without_state(x64, mode, given_state):
    """The layer (nnx.grad of a loss of y and the new state) equals the plain formula on its parameters."""
    conv = make_layer(mode, 4, use_bias=True)
    x, state, _, _ = make_inputs(mode, 2, 8, 6, 4, False, key=11)
    state = state if given_state else None
    weights = jnp.asarray(np.random.default_rng(12).standard_normal((2, 8, 6)), jnp.float32)

    def loss(y, new_state):
        return jnp.sum(y.astype(jnp.float32) * weights) + jnp.sum(jnp.sin(new_state.astype(jnp.float32)))

    @nnx.jit
    def layer_loss(conv, x, state):
        return loss(*conv(x, state))

    @jax.jit
    def reference_loss(kernel, bias, x, state):
        zeros = jnp.zeros((2, 3, 6), x.dtype)
        y, new_state = causal_conv_reference(
            x, zeros if state is None else state, kernel, bias, activation="silu", dtype=conv.dtype
        )
        return loss(y, new_state)

    value, (grads, dx, dstate) = nnx.value_and_grad(layer_loss, argnums=(0, 1, 2))(conv, x, state)
    expected, expected_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2, 3))(
        conv.kernel[...], conv.bias[...], x, state
    )
    assert_close(value, expected, "loss", mode)
    for name, actual, wanted in zip(
        (*PARAMETER_GRADIENTS, "dx", "dstate"), (grads.kernel[...], grads.bias[...], dx, dstate), expected_grads
    ):
        if wanted is None:
            assert actual is None, name
        else:
            assert_close(actual, wanted, name, mode)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_decoding_steps_equal_the_full_sequence(kernel_size):
    """S = 1 steps carrying the state equal the whole sequence at once (bf16 compute, float32 state)."""
    conv = make_layer("bf16", kernel_size, use_bias=True)
    x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 5, 6)), jnp.bfloat16)
    run = nnx.jit(lambda conv, x, state: conv(x, state))
    full, full_state = run(conv, x, conv.init_state(2, dtype=jnp.float32))
    state, steps = conv.init_state(2, dtype=jnp.float32), []
    for t in range(5):
        y, state = run(conv, x[:, t : t + 1], state)
        steps.append(y)
    np.testing.assert_array_equal(jnp.concatenate(steps, axis=1), full)
    np.testing.assert_array_equal(state, full_state)
    assert state.dtype == jnp.float32 and full.dtype == jnp.bfloat16


def test_forward_values_are_the_reference_bitwise():
    """The "jnp" custom-VJP forward runs the same float32 operations as the plain formula (both under jax.jit)."""
    x, state, kernel, bias = make_inputs("bf16", 2, 9, 5, 4, True, key=21)
    y, new_state = jax.jit(causal_conv, static_argnames=("activation", "dtype", "backend"))(
        x, state, kernel, bias, activation="silu", dtype=jnp.bfloat16, backend="jnp"
    )
    expected, expected_state = jax.jit(causal_conv_reference, static_argnames=("activation", "dtype"))(
        x, state, kernel, bias, activation="silu", dtype=jnp.bfloat16
    )
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(new_state, expected_state)


def test_inside_shard_map_with_replicated_state_and_parameters():
    """check_vma=True: x varies over the mesh axis, the state, kernel and bias do not (their cotangents are summed)."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, state, kernel, bias = make_inputs("f32", 1, 6, 4, 3, True, key=31)
    weights = jnp.asarray(np.random.default_rng(32).standard_normal((1, 6, 4)), jnp.float32)

    def conv(fn, x, state, kernel, bias):
        return fn(x, state, kernel, bias, activation="silu", dtype=jnp.float32)[0]

    sharded = jax.shard_map(
        lambda *args: conv(causal_conv, *args),
        mesh=mesh,
        in_specs=(P("data"), P(), P(), P()),
        out_specs=P("data"),
        check_vma=True,
    )
    grads = jax.jit(jax.grad(lambda *args: jnp.sum(sharded(*args) * weights), argnums=(0, 1, 2, 3)))(
        x, state, kernel, bias
    )
    expected = jax.jit(
        jax.grad(lambda *args: jnp.sum(conv(causal_conv_reference, *args) * weights), argnums=(0, 1, 2, 3))
    )(x, state, kernel, bias)
    for name, actual, wanted in zip(("dx", "dstate", *PARAMETER_GRADIENTS), grads, expected, strict=True):
        assert_close(actual, wanted, name, "f32")
