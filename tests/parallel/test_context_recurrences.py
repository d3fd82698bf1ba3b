"""Context parallelism of the non-linear recurrences (M2RNN op and layer, RNN, GRU) on 8 fake CPU devices.

A subprocess (``python -m tests.parallel.test_context_recurrences fast|slow``, with 8 host devices) runs a set of
checks and prints ``OK <name>`` for each; the tests below read its output. Each check compares a run under a mesh
with a ``context`` axis against the same run on one device: forward, loss and every gradient, with the
state-gradient clamp binding. The default run covers the op on every context size (2, 4, 8, with data and tensor
axes) and each layer on context 4 x data 2; ``-m slow`` adds the layers on context 2 x data 4 and context 8.
"""

from __future__ import annotations

import sys

import pytest

from tests.parallel.fake_devices import run_on_fake_devices

FAST = [
    "op_float64_context2_data4_heads",
    "op_float64_context4_batch",
    "op_float64_context8_serial",
    "op_float64_context2_tensor2_data2",
    "op_pallas_gpu_interpret_float32_context4",
    "op_bfloat16_context4",
    "layer_m2rnn_float64_context4_data2",
    "layer_rnn_float64_context4_data2",
    "layer_gru_float64_context4_data2",
    "errors",
]
SLOW = [f"layer_{kind}_float64_{mesh}" for kind in ("m2rnn", "rnn", "gru") for mesh in ("context2_data4", "context8")]


def _run(which: str) -> list[str]:
    return run_on_fake_devices("tests.parallel.test_context_recurrences", which, timeout=1800)


@pytest.fixture(scope="module")
def output() -> list[str]:
    return _run("fast")


@pytest.mark.parametrize("name", FAST)
def test_context_parallel(output: list[str], name: str) -> None:
    assert f"OK {name}" in output, "\n".join(output)


@pytest.mark.slow
def test_context_parallel_layers_on_more_meshes() -> None:
    lines = _run("slow")
    for name in SLOW:
        assert f"OK {name}" in lines, "\n".join(lines)


# ---------------------------------------------------------------- the checks (run in the 8-device subprocess)


def _max_error(got, expected) -> float:
    import jax
    import numpy as np

    errors = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), got, expected)
    return max(jax.tree.leaves(errors))


def _check_op(
    name: str,
    axes: dict[str, int],
    *,
    batch: int,
    num_micro_batches: int | None = None,
    dtype=None,
    backend: str = "scan",
    tolerance: float = 1e-10,
    gradient_tolerance: float | None = None,
) -> None:
    """context_m2rnn under ``axes`` == the op on one device (value and the gradients of q, k, v, W, f, h0), with a
    clamp that binds (the clipped gradients differ from the unclipped ones). Values within ``tolerance``, gradients
    within ``gradient_tolerance`` (default: ``tolerance``) relative to 1 + their largest magnitude."""
    import jax
    import jax.numpy as jnp

    from m2rnn_jax.ops import m2rnn
    from m2rnn_jax.parallel.context.m2rnn import context_m2rnn
    from m2rnn_jax.parallel.mesh import build_mesh
    from m2rnn_jax.testing import random_m2rnn_inputs

    dtype = dtype or jnp.float64
    inputs = random_m2rnn_inputs(
        jax.random.key(0),
        batch=batch,
        seq_len=16,
        num_heads=4,
        k_dim=3,
        v_dim=2,
        num_q_heads=1,
        num_k_heads=1,
        num_v_heads=4,
        num_f_heads=4,
        num_w_heads=2,
        dtype=dtype,
    )
    args = tuple(inputs[n] for n in ("q", "k", "v", "W", "f", "h0"))
    argnums = tuple(range(len(args)))

    def loss(fn, clip):
        def value(*a):
            y, h = fn(*a, gradient_clipping=clip, backend=backend, interpret=backend != "scan")
            return jnp.sum(y * jnp.cos(3 * y)) + jnp.sum(jnp.sin(5 * h))

        return jax.jit(jax.value_and_grad(value, argnums=argnums))

    expected = loss(lambda *a, backend, interpret, **k: m2rnn(*a, backend="scan", **k), 0.05)(*args)
    unclipped = loss(lambda *a, backend, interpret, **k: m2rnn(*a, backend="scan", **k), None)(*args)
    assert _max_error(expected[1], unclipped[1]) > 1e-2, "the clamp does not bind"
    with jax.set_mesh(build_mesh(axes)):
        got = loss(lambda *a, **k: context_m2rnn(*a, num_micro_batches=num_micro_batches, **k), 0.05)(*args)
        y, h = jax.jit(lambda *a: context_m2rnn(*a, backend=backend, interpret=backend != "scan"))(*args[:5])
    reference = m2rnn(*args[:5], backend="scan")
    assert (y.dtype, h.dtype) == (reference[0].dtype, reference[1].dtype), (y.dtype, h.dtype)
    value_error = max(_max_error(got[0], expected[0]), _max_error((y, h), reference))
    assert value_error <= tolerance, f"{name}: values: max error {value_error:.2e}"
    gradient_error = max(_max_error(a, b) / (1 + _max_error(b, 0 * b)) for a, b in zip(got[1], expected[1]))
    limit = tolerance if gradient_tolerance is None else gradient_tolerance
    assert gradient_error <= limit, f"{name}: gradients: max relative error {gradient_error:.2e}"
    print(f"OK {name}")


MESHES = {
    "context4_data2": {"context": 4, "data": 2},
    "context2_data4": {"context": 2, "data": 4},
    "context8": {"context": 8},
}


def _check_layer(kind: str, meshes: list[str]) -> None:
    """The M2RNN / RNN / GRU layer (float64) under each of ``meshes`` == one device: output, final state and the
    gradients of x and every parameter, with documents (segment_ids) whose boundaries fall inside shards and on a
    shard boundary."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m2rnn_jax.layers.gru import GRU, GRUConfig
    from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig
    from m2rnn_jax.layers.rnn import RNN, RNNConfig
    from m2rnn_jax.parallel.mesh import build_mesh

    rngs = nnx.Rngs(0)
    common = dict(num_layers=2, initializer_range=0.5, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    if kind == "m2rnn":
        layer = M2RNN(12, M2RNNConfig(num_heads=4, k_head_dim=3, v_head_dim=2, gradient_clipping=0.02), **common)
    else:
        layer_class, config_class = {"rnn": (RNN, RNNConfig), "gru": (GRU, GRUConfig)}[kind]
        layer = layer_class(12, config_class(num_heads=4, head_dim=3, gradient_clipping=0.02), **common)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (4, 24, 12), jnp.float64)  # >= kernel_size - 1 positions per shard
    starts = jnp.zeros((4, 24), jnp.int32).at[0, 5].set(1).at[1, 12].set(1).at[2, 6].set(1).at[2, 13].set(1)
    segment_ids = jnp.cumsum(starts, axis=1)  # rows 0-2: 2-3 documents, starting inside shards and on boundaries

    def value(params, x):
        y, state = nnx.merge(graphdef, params)(x, segment_ids=segment_ids)
        return jnp.sum(y * jnp.cos(3 * y)) + jnp.sum(jnp.sin(5 * state.recurrent)), (y, state)

    step = jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))
    expected = step(params, x)
    for mesh in meshes:
        with jax.set_mesh(build_mesh(MESHES[mesh])):
            got = jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))(params, x)
        error = _max_error(got, expected)
        assert error < 1e-10, f"{kind} {mesh}: max error {error:.2e}"
        print(f"OK layer_{kind}_float64_{mesh}")


def _check_errors() -> None:
    """A sequence length not divisible by the context size names both; so does attention's cached decoding."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m2rnn_jax.layers.attention import Attention, AttentionConfig
    from m2rnn_jax.layers.rnn import RNN, RNNConfig
    from m2rnn_jax.parallel.context.m2rnn import context_m2rnn
    from m2rnn_jax.parallel.mesh import build_mesh
    from m2rnn_jax.testing import random_m2rnn_inputs

    inputs = random_m2rnn_inputs(jax.random.key(0), batch=2, seq_len=6, num_heads=2, k_dim=2, v_dim=2)
    layer = RNN(8, RNNConfig(num_heads=2, head_dim=4, kernel_size=None), num_layers=1, rngs=nnx.Rngs(0))
    with jax.set_mesh(build_mesh({"context": 4, "data": 2})):
        try:
            context_m2rnn(*(inputs[n] for n in ("q", "k", "v", "W", "f")))
        except ValueError as error:
            assert "expected a multiple of the context axis size 4" in str(error) and "got 6" in str(error), error
        else:
            raise AssertionError("no error for S=6 over 4 context shards")
        try:
            layer(jnp.zeros((2, 10, 8)))
        except ValueError as error:
            assert "expected a multiple of the context axis size 4" in str(error) and "got 10" in str(error), error
        else:
            raise AssertionError("no error for S=10 over 4 context shards in a layer")
        attention = Attention(8, AttentionConfig(num_heads=2), num_layers=1, rngs=nnx.Rngs(0))
        try:
            attention(jnp.zeros((2, 4, 8)), attention.init_state(2, 16))
        except ValueError as error:
            assert "state (cached decoding): expected None" in str(error), error
            assert "'context' of size 4" in str(error), error
        else:
            raise AssertionError("no error for cached decoding under a context axis")
    print("OK errors")


def main(which: str) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    if which == "slow":
        for kind in ("m2rnn", "rnn", "gru"):
            _check_layer(kind, ["context2_data4", "context8"])
        return
    _check_op("op_float64_context2_data4_heads", {"context": 2, "data": 4}, batch=4)
    _check_op("op_float64_context4_batch", {"context": 4, "data": 2}, batch=8, num_micro_batches=4)
    _check_op("op_float64_context8_serial", {"context": 8}, batch=2, num_micro_batches=1)
    _check_op("op_float64_context2_tensor2_data2", {"context": 2, "tensor": 2, "data": 2}, batch=2)
    _check_op(
        "op_pallas_gpu_interpret_float32_context4",
        {"context": 4, "data": 2},
        batch=2,
        dtype=jnp.float32,
        backend="pallas_gpu",
        tolerance=1e-5,
    )
    _check_op(
        "op_bfloat16_context4",
        {"context": 4, "data": 2},
        batch=2,
        dtype=jnp.bfloat16,
        tolerance=0.0,
        gradient_tolerance=2**-7,
    )
    for kind in ("m2rnn", "rnn", "gru"):
        _check_layer(kind, ["context4_data2"])
    _check_errors()


if __name__ == "__main__":
    main(sys.argv[1])
