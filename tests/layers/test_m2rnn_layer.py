"""The M2RNN layer: shapes, init, a float64 NumPy forward of the whole layer, decode == prefill, gradients,
config validation.

The NumPy forward below is written from SPEC §3.2 with a plain time loop; it shares no code with the op.
"""

from __future__ import annotations

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import m2rnn_jax.layers.m2rnn as m2rnn_layer_module
from m2rnn_jax.layers import M2RNN, M2RNNConfig, M2RNNState
from tests.layers.test_conv import numpy_causal_conv

# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_layer(config, *, hidden=12, dtype=jnp.float32, param_dtype=jnp.float32, seed=0, num_layers=2):
    layer = M2RNN(hidden, config, num_layers=num_layers, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    randomize_parameters(layer, jax.random.key(seed + 1000))
    return layer


def randomize_parameters(layer: M2RNN, key: jax.Array) -> None:
    """Replace the init with realistic random values so every term of the forward matters.

    Projections of unit gain (q, k, v, g of order one), W near the identity, D, norm scale and biases away from
    their constant init; A_log and dt_bias keep the SPEC init so that f comes from the decay gate as in training.
    """
    keys = iter(jax.random.split(key, 16))

    def normal(variable, std, mean=0.0):
        value = variable[...]
        variable[...] = (mean + std * jax.random.normal(next(keys), value.shape, jnp.float32)).astype(value.dtype)

    hidden, _ = layer.input_projection.kernel[...].shape
    normal(layer.input_projection.kernel, hidden**-0.5)
    if layer.input_projection.bias is not None:
        normal(layer.input_projection.bias, 0.1)
    if layer.conv1d is not None:
        normal(layer.conv1d.kernel, 0.5)
        if layer.conv1d.bias is not None:
            normal(layer.conv1d.bias, 0.1)
    W = layer.state_weight[...]
    layer.state_weight[...] = W + (0.2 * jax.random.normal(next(keys), W.shape, jnp.float32)).astype(W.dtype)
    if layer.D is not None:
        normal(layer.D, 0.3, mean=1.0)
    normal(layer.g_norm.scale, 0.3, mean=1.0)
    normal(layer.output_projection.kernel, layer.output_projection.kernel[...].shape[0] ** -0.5)


def numpy_params(layer: M2RNN) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(layer, nnx.Param)))


def numpy_m2rnn_layer(p: dict, c: M2RNNConfig, x: np.ndarray, conv_state=None, h0=None):
    """Float64 forward of the lm-engine M2RNN layer (SPEC §3.2): x (B, S, h) -> (y, conv state, H_T)."""
    x = np.asarray(x, np.float64)
    B, S, _ = x.shape
    N, K, V = c.num_heads, c.k_head_dim, c.v_head_dim
    proj = x @ p["input_projection"]["kernel"]
    if "bias" in p["input_projection"]:
        proj = proj + p["input_projection"]["bias"]
    C = c.conv_channels
    qkv, f_raw, g = proj[..., :C], proj[..., C : C + c.num_f_heads], proj[..., C + c.num_f_heads :]

    gate = p["decay_gate"]
    f = np.exp(-np.exp(gate["A_log"]) * np.logaddexp(0.0, f_raw + gate["dt_bias"]))  # (B, S, N)

    new_conv_state = None
    if c.kernel_size is not None:
        history = np.zeros((B, c.kernel_size - 1, C)) if conv_state is None else np.asarray(conv_state, np.float64)
        conv = p["conv1d"]
        qkv_raw = qkv
        qkv = numpy_causal_conv(qkv, conv["kernel"], conv.get("bias"), history, c.activation_function == "silu")
        new_conv_state = np.concatenate([history, qkv_raw], axis=1)[:, S:]

    Q = c.q_channels  # 0 with a learned query: one (Nq, K) parameter for every token
    if c.query == "learned":
        q = np.broadcast_to(p["query"], (B, S, c.num_q_heads, K))
    else:
        q = qkv[..., :Q].reshape(B, S, c.num_q_heads, K)
    k = qkv[..., Q : Q + c.num_k_heads * K].reshape(B, S, c.num_k_heads, K)
    v = qkv[..., Q + c.num_k_heads * K :].reshape(B, S, c.num_v_heads, V)

    def per_head(a, axis):  # source head n // (N / N_x) serves output head n
        return np.repeat(a, N // a.shape[axis], axis=axis)

    qN, kN, vN, WN = per_head(q, 2), per_head(k, 2), per_head(v, 2), per_head(p["state_weight"], 0)
    H = np.zeros((B, N, K, V)) if h0 is None else np.array(h0, np.float64)
    y = np.zeros((B, S, N, V))
    for t in range(S):
        for b in range(B):
            for n in range(N):
                Z = np.tanh(H[b, n] @ WN[n] + np.outer(kN[b, t, n], vN[b, t, n]))
                H[b, n] = f[b, t, n] * H[b, n] + (1.0 - f[b, t, n]) * Z
                y[b, t, n] = H[b, n].T @ qN[b, t, n]
    if c.use_residual:
        y = y + v * p["D"]
    g = per_head(g.reshape(B, S, c.num_g_heads, V), 2)
    y = (y * g / (1.0 + np.exp(-g))).reshape(B, S, N * V)
    y = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + c.norm_eps) * p["g_norm"]["scale"]
    return y @ p["output_projection"]["kernel"], new_conv_state, H


def random_state(layer: M2RNN, batch: int, key: jax.Array, dtype) -> M2RNNState:
    """A mid-sequence state: raw conv inputs of unit scale, a recurrent state inside [-1, 1]."""
    zeros = layer.init_state(batch, 1, dtype=dtype)
    key_c, key_h = jax.random.split(key)
    conv = None if zeros.conv is None else jax.random.normal(key_c, zeros.conv.shape, jnp.float32).astype(dtype)
    recurrent = jnp.tanh(jax.random.normal(key_h, zeros.recurrent.shape, jnp.float32)).astype(dtype)
    return M2RNNState(conv=conv, recurrent=recurrent)


@jax.jit
def apply(layer: M2RNN, x: jax.Array, state: M2RNNState | None = None):
    """One jitted call of the layer; compiled once per (config, dtypes, shapes) and shared across tests."""
    return layer(x, state)


def decode_token_by_token(layer: M2RNN, x: jax.Array, state: M2RNNState):
    outputs = []
    for t in range(x.shape[1]):
        y, state = apply(layer, x[:, t : t + 1], state)
        outputs.append(y)
    return jnp.concatenate(outputs, axis=1), state


PAPER_LIKE = M2RNNConfig(num_heads=4, k_head_dim=8, v_head_dim=4)  # Nq = Nk = 1, conv 4, residual, clipping 1
BROADCAST = M2RNNConfig(
    num_heads=4, k_head_dim=3, v_head_dim=2, num_q_heads=2, num_k_heads=4, num_g_heads=2, num_weight_heads=2,
    kernel_size=2, add_bias=True,
)  # fmt: skip
LEARNED_QUERY = dataclasses.replace(BROADCAST, query="learned")
NO_CONV_NO_RESIDUAL = M2RNNConfig(
    num_heads=4, k_head_dim=4, v_head_dim=3, num_v_heads=2, kernel_size=None, activation_function=None,
    use_residual=False, gradient_clipping=None,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# shapes, dtypes, parameters, init


def test_parameter_shapes_follow_the_table():
    c = BROADCAST
    layer = M2RNN(10, c, num_layers=3, rngs=nnx.Rngs(0))
    C, N, V = c.conv_channels, c.num_heads, c.v_head_dim
    assert C == 2 * 3 + 4 * 3 + 4 * 2
    expected = {
        "input_projection": {"kernel": (10, C + 4 + 2 * V), "bias": (C + 4 + 2 * V,)},
        "conv1d": {"kernel": (2, C), "bias": (C,)},
        "decay_gate": {"A_log": (N,), "dt_bias": (N,)},
        "D": (N, V),
        "state_weight": (2, V, V),
        "g_norm": {"scale": (N * V,)},
        "output_projection": {"kernel": (N * V, 10)},
    }
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == expected


@pytest.mark.parametrize("hidden, num_heads, expected", [(1024, 84, 4_376_104), (1536, 132, 10_178_696)])
def test_paper_layer_parameter_counts(hidden, num_heads, expected):
    """SPEC §3.3: 4.376M parameters per M2RNN layer at 400M, 10.179M at 7B."""
    layer = nnx.eval_shape(lambda: M2RNN(hidden, M2RNNConfig(num_heads=num_heads), num_layers=24, rngs=nnx.Rngs(0)))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param))) == expected


def test_output_and_state_shapes_and_dtypes_bf16_compute():
    layer = make_layer(PAPER_LIKE, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 5, 12), jnp.float32)
    y, state = apply(layer, x)
    assert y.shape == (2, 5, 12) and y.dtype == jnp.bfloat16
    assert state.conv.shape == (2, 3, PAPER_LIKE.conv_channels) and state.conv.dtype == jnp.float32
    assert state.recurrent.shape == (2, 4, 8, 4) and state.recurrent.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    # the recurrent state of a sequence started from zeros stays inside [-1, 1] (convex blend of tanh values)
    assert float(jnp.abs(state.recurrent).max()) <= 1.0


def test_no_conv_layer_has_no_conv_state():
    layer = make_layer(NO_CONV_NO_RESIDUAL)
    y, state = apply(layer, jax.random.normal(jax.random.key(0), (1, 3, 12), jnp.float32))
    assert state.conv is None and layer.conv1d is None and layer.D is None and y.shape == (1, 3, 12)


def test_init_statistics_follow_spec():
    c = M2RNNConfig(num_heads=16, k_head_dim=16, v_head_dim=16)
    num_layers, sigma = 6, 0.02
    layer = M2RNN(256, c, num_layers=num_layers, initializer_range=sigma, rngs=nnx.Rngs(0))
    w_in = np.asarray(layer.input_projection.kernel[...])
    w_out = np.asarray(layer.output_projection.kernel[...])
    w_conv = np.asarray(layer.conv1d.kernel[...])
    # sample std: relative standard error 1/sqrt(2n) (0.2% for 143k, 0.3% for 65k, 2% for 1152 samples)
    assert abs(w_in.std() / sigma - 1) < 0.02 and abs(w_in.mean()) < 0.01 * sigma
    assert abs(w_out.std() / (sigma / np.sqrt(2 * num_layers)) - 1) < 0.02
    assert abs(w_conv.std() / sigma - 1) < 0.1
    np.testing.assert_array_equal(layer.state_weight[...], np.broadcast_to(np.eye(16, dtype=np.float32), (16, 16, 16)))
    np.testing.assert_array_equal(layer.D[...], np.ones((16, 16), np.float32))
    np.testing.assert_array_equal(layer.g_norm.scale[...], np.ones(256, np.float32))
    A = np.exp(np.asarray(layer.decay_gate.A_log[...], np.float64))
    dt = np.logaddexp(0.0, np.asarray(layer.decay_gate.dt_bias[...], np.float64))
    assert A.min() >= 0 and A.max() <= 16 and dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert layer.input_projection.bias is None and layer.conv1d.bias is None


def test_state_weight_init_std_draws_a_normal_weight():
    c = M2RNNConfig(num_heads=4, k_head_dim=2, v_head_dim=64, state_weight_init_std=0.2)
    W = np.asarray(M2RNN(16, c, num_layers=1, rngs=nnx.Rngs(0)).state_weight[...])
    # 16384 samples: relative standard error of the std 0.6%
    assert W.shape == (4, 64, 64) and abs(W.std() / 0.2 - 1) < 0.03 and abs(W.mean()) < 0.01


def test_param_dtype_bf16_keeps_gate_in_float32():
    layer = M2RNN(8, PAPER_LIKE, num_layers=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layer.input_projection.kernel[...].dtype == jnp.bfloat16 and layer.state_weight[...].dtype == jnp.bfloat16
    assert layer.decay_gate.A_log[...].dtype == jnp.float32 and layer.decay_gate.dt_bias[...].dtype == jnp.float32


def test_logical_axis_metadata():
    layer = M2RNN(8, BROADCAST, num_layers=1, rngs=nnx.Rngs(0))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(layer, nnx.Param)))
    assert specs["input_projection"]["kernel"] == jax.P("embed", None)
    assert specs["output_projection"]["kernel"] == jax.P("heads", "embed")
    assert specs["state_weight"] == jax.P("heads", None, None)
    assert specs["D"] == jax.P("heads", None)
    assert specs["decay_gate"]["A_log"] == jax.P("heads")


# ----------------------------------------------------------------------------------------------------------------
# forward vs NumPy


@pytest.mark.parametrize(
    "config",
    [PAPER_LIKE, BROADCAST, LEARNED_QUERY, NO_CONV_NO_RESIDUAL],
    ids=["paper", "broadcast", "learned_query", "bare"],
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
def test_layer_matches_numpy_float64(x64, config, with_state):
    layer = make_layer(config, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 6, 12), jnp.float64)
    state = random_state(layer, 2, jax.random.key(2), jnp.float64) if with_state else None
    y, new_state = apply(layer, x, state)
    expected_y, expected_conv, expected_h = numpy_m2rnn_layer(
        numpy_params(layer),
        config,
        np.asarray(x),
        conv_state=None if state is None else state.conv,
        h0=None if state is None else state.recurrent,
    )
    assert y.dtype == jnp.float64 and new_state.recurrent.dtype == jnp.float64
    np.testing.assert_allclose(y, expected_y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_state.recurrent, expected_h, rtol=1e-10, atol=1e-12)
    if config.kernel_size is not None:
        np.testing.assert_array_equal(new_state.conv, expected_conv)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_layer_matches_numpy_on_random_shapes(data):
    num_heads = data.draw(st.sampled_from([1, 2, 4]), "num_heads")
    divisors = [d for d in (1, 2, 4) if num_heads % d == 0]
    use_residual = data.draw(st.booleans(), "use_residual")
    kernel_size = data.draw(st.sampled_from([None, 1, 2, 4]), "kernel_size")
    config = M2RNNConfig(
        num_heads=num_heads,
        k_head_dim=data.draw(st.integers(1, 4), "K"),
        v_head_dim=data.draw(st.integers(1, 3), "V"),
        num_q_heads=data.draw(st.sampled_from(divisors), "Nq"),
        num_k_heads=data.draw(st.sampled_from(divisors), "Nk"),
        num_v_heads=num_heads if use_residual else data.draw(st.sampled_from(divisors), "Nv"),
        num_g_heads=data.draw(st.sampled_from(divisors), "Ng"),
        num_weight_heads=data.draw(st.sampled_from(divisors), "Nw"),
        kernel_size=kernel_size,
        activation_function=None if kernel_size is None else "silu",
        use_residual=use_residual,
        add_bias=data.draw(st.booleans(), "add_bias"),
    )
    batch, seq_len = data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, 5), "S")
    with jax.enable_x64(True):
        layer = make_layer(config, hidden=5, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(seq_len), (batch, seq_len, 5), jnp.float64)
        y, state = apply(layer, x)
        expected_y, _, expected_h = numpy_m2rnn_layer(numpy_params(layer), config, np.asarray(x))
        np.testing.assert_allclose(y, expected_y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.recurrent, expected_h, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# decoding


def test_decode_equals_prefill_float64(x64):
    layer = make_layer(PAPER_LIKE, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(3), (2, 7, 12), jnp.float64)
    full, full_state = apply(layer, x)
    steps, step_state = decode_token_by_token(layer, x, layer.init_state(2, 7, dtype=jnp.float64))
    np.testing.assert_allclose(steps, full, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(step_state.recurrent, full_state.recurrent, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(step_state.conv, full_state.conv)


def test_decode_equals_prefill_float32():
    layer = make_layer(BROADCAST)
    x = jax.random.normal(jax.random.key(4), (2, 6, 12), jnp.float32)
    full, full_state = apply(layer, x)
    steps, step_state = decode_token_by_token(layer, x, layer.init_state(2, 6))
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step_state.recurrent, full_state.recurrent, rtol=1e-5, atol=1e-5)


def test_prefill_from_state_continues_the_sequence(x64):
    layer = make_layer(BROADCAST, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(5), (2, 8, 12), jnp.float64)
    full, full_state = apply(layer, x)
    head, state = apply(layer, x[:, :3])
    middle, state = apply(layer, x[:, 3:4], state)  # one decode step between two prefills
    tail, state = apply(layer, x[:, 4:], state)
    np.testing.assert_allclose(jnp.concatenate([head, middle, tail], axis=1), full, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.recurrent, full_state.recurrent, rtol=1e-12, atol=1e-13)


def test_decode_and_prefill_bf16_are_close_to_float64():
    """bf16 compute (float32 params and state): both paths against the float64 truth; errors are reported."""
    layer = make_layer(PAPER_LIKE, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(6), (2, 8, 12), jnp.float32)
    truth, _, _ = numpy_m2rnn_layer(numpy_params(layer), PAPER_LIKE, np.asarray(x))
    full, _ = apply(layer, x)
    steps, _ = decode_token_by_token(layer, x, layer.init_state(2, 8))
    scale = np.abs(truth).max()
    err_prefill = np.abs(np.asarray(full, np.float64) - truth).max() / scale
    err_decode = np.abs(np.asarray(steps, np.float64) - truth).max() / scale
    err_between = np.abs(np.asarray(full, np.float64) - np.asarray(steps, np.float64)).max() / scale
    print(f"bf16 max error / max |y|: prefill {err_prefill:.2e}, decode {err_decode:.2e}, between {err_between:.2e}")
    assert err_prefill < 3e-2 and err_decode < 3e-2 and err_between < 3e-2


# ----------------------------------------------------------------------------------------------------------------
# gradients


def test_gradients_of_every_parameter_match_finite_differences(x64):
    # clipping off: with it the backward is deliberately not the derivative of the forward
    config = dataclasses.replace(BROADCAST, k_head_dim=2, num_q_heads=1, gradient_clipping=None)
    layer = make_layer(config, hidden=4, dtype=jnp.float64, param_dtype=jnp.float64)
    graphdef, params = nnx.split(layer, nnx.Param)
    x = jax.random.normal(jax.random.key(7), (1, 4, 4), jnp.float64)
    h0 = random_state(layer, 1, jax.random.key(8), jnp.float64)

    @jax.jit
    def forward(params, x, recurrent):
        y, state = nnx.merge(graphdef, params)(x, h0._replace(recurrent=recurrent))
        return y, state.recurrent

    check_grads(forward, (params, x, h0.recurrent), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)

    cotangent = jax.random.normal(jax.random.key(9), (1, 4, 4), jnp.float64)
    grads = jax.grad(lambda p: jnp.sum(forward(p, x, h0.recurrent)[0] * cotangent))(params)
    norms = {path: float(jnp.linalg.norm(g)) for path, g in nnx.to_flat_state(grads)}
    assert len(norms) == 10 and min(norms.values()) > 0.0, norms


def test_default_config_trains_under_jit():
    """The paper config (gradient_clipping=1.0, backend="auto") inside one jitted value_and_grad."""
    layer = make_layer(M2RNNConfig(num_heads=4, k_head_dim=8, v_head_dim=4))
    graphdef, params = nnx.split(layer, nnx.Param)
    x = jax.random.normal(jax.random.key(11), (1, 5, 12), jnp.float32)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)))(params)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_gradient_clipping_backend_and_documents_reach_the_op(monkeypatch):
    calls = []
    real_op = m2rnn_layer_module.m2rnn

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_op(*args, **kwargs)

    monkeypatch.setattr(m2rnn_layer_module, "m2rnn", spy)
    config = dataclasses.replace(PAPER_LIKE, gradient_clipping=0.25, backend="scan")
    layer = make_layer(config)
    layer(jnp.ones((1, 2, 12), jnp.float32))
    assert calls == [{"reset": None, "gradient_clipping": 0.25, "backend": "scan", "check_values": None}]
    layer(jnp.ones((1, 3, 12), jnp.float32), segment_ids=jnp.asarray([[4, 4, 2]], jnp.int32))
    np.testing.assert_array_equal(calls[1]["reset"], [[False, False, True]])


def test_gradient_clipping_changes_only_the_backward():
    x = jax.random.normal(jax.random.key(10), (1, 6, 12), jnp.float32)

    def loss_and_grads(clip):
        layer = make_layer(dataclasses.replace(PAPER_LIKE, gradient_clipping=clip), seed=3)
        graphdef, params = nnx.split(layer, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(params)

    loss_free, grads_free = loss_and_grads(None)
    loss_clip, grads_clip = loss_and_grads(1e-4)
    np.testing.assert_allclose(loss_clip, loss_free, rtol=1e-6)
    # the output projection's gradient does not pass through the recurrence; W's does
    out_clip, out_free = grads_clip["output_projection"]["kernel"][...], grads_free["output_projection"]["kernel"][...]
    np.testing.assert_allclose(out_clip, out_free, rtol=1e-5)
    assert not np.allclose(grads_clip["state_weight"][...], grads_free["state_weight"][...], rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 0}, "num_heads: expected a positive int"),
        ({"num_heads": 4, "k_head_dim": True}, "k_head_dim"),
        ({"num_heads": 4, "num_q_heads": 3}, "num_q_heads: expected a divisor of num_heads=4, got 3"),
        ({"num_heads": 4, "num_g_heads": 3}, "num_g_heads: expected a divisor"),
        ({"num_heads": 4, "num_weight_heads": 8}, "num_weight_heads: expected a divisor"),
        (
            {"num_heads": 8, "num_v_heads": 4, "num_f_heads": 4, "num_weight_heads": 4, "use_residual": False},
            "num_heads: expected max",
        ),
        ({"num_heads": 4, "num_f_heads": 2}, "num_f_heads: expected num_heads=4"),
        ({"num_heads": 4, "num_v_heads": 2}, "num_v_heads: expected num_heads=4 when use_residual"),
        ({"num_heads": 4, "kernel_size": None}, "activation_function: expected None when kernel_size is None"),
        ({"num_heads": 4, "kernel_size": 0}, "kernel_size"),
        ({"num_heads": 4, "activation_function": "gelu"}, "activation_function: expected one of"),
        ({"num_heads": 4, "backend": "cuda"}, "backend: expected one of"),
        ({"num_heads": 4, "norm_eps": 0.0}, "norm_eps"),
        ({"num_heads": 4, "A_init_min": -1.0}, "A_init_min"),
        ({"num_heads": 4, "dt_init_min": 0.0}, "dt_init_min"),
        ({"num_heads": 4, "state_weight_init_std": 0.0}, "state_weight_init_std: expected None or > 0"),
        ({"num_heads": 4, "query": "fixed"}, "query: expected one of \\('token', 'learned'\\)"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M2RNNConfig(**kwargs)


def test_config_defaults_fill_head_counts():
    c = M2RNNConfig(num_heads=84)
    assert (c.num_v_heads, c.num_f_heads, c.num_g_heads, c.num_weight_heads) == (84, 84, 84, 84)
    # the 400M layer of SPEC §3.2: C = 1472, projection width 2900
    assert c.conv_channels == 1472 and c.projection_size == 2900


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hidden_size"):
        M2RNN(0, PAPER_LIKE, num_layers=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_layers"):
        M2RNN(8, PAPER_LIKE, num_layers=0, rngs=nnx.Rngs(0))
    layer = M2RNN(8, PAPER_LIKE, num_layers=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, S, 8\), got \(2, 3, 7\)"):
        layer(jnp.ones((2, 3, 7), jnp.float32))
    state = layer.init_state(2, 3)
    with pytest.raises(ValueError, match=r"state.conv: expected an array"):
        layer(jnp.ones((2, 3, 8), jnp.float32), state._replace(conv=None))


def test_learned_query_drops_the_q_columns_and_is_trained_without_decay():
    """query="learned": the projection and the conv lose the Nq*K query channels, the (Nq, K) query parameter gets a
    gradient, and the weight-decay mask leaves it out (a readout direction)."""
    from m2rnn_jax.train.config import OptimizerConfig
    from m2rnn_jax.train.optimizer import weight_decay_mask

    token, learned = (make_layer(c, hidden=12) for c in (BROADCAST, LEARNED_QUERY))
    q_channels = BROADCAST.num_q_heads * BROADCAST.k_head_dim
    assert LEARNED_QUERY.q_channels == 0 and LEARNED_QUERY.conv_channels == BROADCAST.conv_channels - q_channels
    assert learned.input_projection.kernel.shape[1] == token.input_projection.kernel.shape[1] - q_channels
    assert learned.conv1d.kernel.shape[1] == BROADCAST.conv_channels - q_channels
    assert learned.query.shape == (LEARNED_QUERY.num_q_heads, LEARNED_QUERY.k_head_dim)
    x = jax.random.normal(jax.random.key(3), (2, 5, 12))
    grads = nnx.grad(lambda layer: jnp.sum(layer(x)[0] ** 2))(learned)
    assert float(jnp.max(jnp.abs(grads["query"][...]))) > 0
    mask = weight_decay_mask(nnx.state(learned, nnx.Param), OptimizerConfig().no_decay_names)
    decays = {"/".join(map(str, path)): bool(v.get_value()) for path, v in nnx.to_flat_state(mask)}
    assert not decays["query"] and decays["input_projection/kernel"] and decays["state_weight"]
