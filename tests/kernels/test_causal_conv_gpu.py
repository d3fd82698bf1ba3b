"""The fused causal depthwise conv (pallas_kernels/gpu/causal_conv.py) against the plain formula.

In interpret mode on any platform: the kernels called directly with small tiles (several row, channel and
row-group blocks, ragged S and C) against autodiff of ``causal_conv_reference``, and ``causal_conv`` with
``backend="pallas_gpu"`` and ``"pallas_gpu_transpose"`` (values, new state and every gradient) for kernel sizes
1..4, with and without bias and activation, float32 and bf16 inputs, a nonzero state, S shorter than the state,
under ``jax.vmap`` and a ``jax.shard_map``. Tests marked ``gpu`` run the compiled kernels on an NVIDIA GPU at the
GDN conv's shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from m2rnn_jax.layers.conv import causal_conv, causal_conv_reference, resolve_conv_backend
from m2rnn_jax.testing import cuda_lowering_without_a_gpu
from pallas_kernels.gpu.causal_conv import (
    ConvKernelConfig,
    causal_conv_backward,
    causal_conv_forward,
    default_config,
)
from tests.layers.test_conv_vjp import (
    MODES,
    assert_close,
    assert_results_match,
    make_inputs,
    values_and_gradients,
)

FUSED = dict(backend="pallas_gpu", interpret=True)
SMALL_TILES = ConvKernelConfig(block_s=8, block_c=16, blocks_per_program=2)


def fused_conv(x, state, kernel, bias, *, activation, dtype):
    return causal_conv(x, state, kernel, bias, activation=activation, dtype=dtype, **FUSED)


def reference_gradients(x, state, kernel, bias, dy, activation, dtype):
    """y and the cotangents of (x, state, kernel, bias) of the plain formula for the cotangent dy of y."""
    run = lambda *args: causal_conv_reference(*args, activation=activation, dtype=dtype)[0]
    y, vjp = jax.vjp(run, x, state, kernel, bias)
    return y, vjp(dy)


def compare(mode: str, x, state, kernel, bias, activation, fn=fused_conv, transform=lambda f: f) -> None:
    """values_and_gradients of ``fn`` and of the reference under ``jax.jit(transform(...))`` agree."""
    dtype = MODES[mode][3]
    outputs, grads = jax.jit(
        transform(lambda *args: values_and_gradients(fn, *args, activation=activation, dtype=dtype))
    )(x, state, kernel, bias)
    expected_outputs, expected_grads = jax.jit(
        transform(lambda *args: values_and_gradients(causal_conv_reference, *args, activation=activation, dtype=dtype))
    )(x, state, kernel, bias)
    assert_results_match((outputs, grads), (expected_outputs, expected_grads), mode)


@pytest.mark.parametrize("mode", ["f32", "bf16"])
@pytest.mark.parametrize(
    "kernel_size, use_bias, activation", [(1, True, "silu"), (2, False, None), (3, True, None), (4, False, "silu")]
)
def test_kernels_with_small_tiles_match_reference(mode, kernel_size, use_bias, activation):
    """S = 37 over 8-row blocks in groups of 2 (3 groups, the last ragged), C = 20 over 16-channel blocks."""
    x, state, kernel, bias = make_inputs(mode, 2, 37, 20, kernel_size, use_bias, key=kernel_size)
    dtype = MODES[mode][3]
    dy = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), dtype)
    act = None if activation is None else jax.nn.silu
    y = causal_conv_forward(x, state, kernel, bias, activation=act, out_dtype=dtype, config=SMALL_TILES, interpret=True)
    dx, dkernel, dbias = causal_conv_backward(
        x, state, kernel, bias, dy, activation=act, config=SMALL_TILES, interpret=True
    )
    expected_y, (expected_dx, _, expected_dkernel, expected_dbias) = reference_gradients(
        x, state, kernel, bias, dy, activation, dtype
    )
    assert_close(y, expected_y, "y", mode)
    assert_close(dx, expected_dx, "dx", mode)
    assert_close(dkernel, expected_dkernel, "dkernel", mode)
    if use_bias:
        assert_close(dbias, expected_dbias, "dbias", mode)
    else:
        assert dbias is None


@pytest.mark.parametrize("mode", ["f32", "bf16"])
@pytest.mark.parametrize(
    "kernel_size, use_bias, activation", [(1, False, None), (2, True, "silu"), (3, False, "silu"), (4, True, None)]
)
def test_causal_conv_pallas_gpu_matches_reference(mode, kernel_size, use_bias, activation):
    """The layer's function with the default tiles: y, new state and the gradients of x, state, kernel, bias."""
    x, state, kernel, bias = make_inputs(mode, 2, 13, 6, kernel_size, use_bias, key=10 + kernel_size)
    compare(mode, x, state, kernel, bias, activation)


def transpose_conv(x, state, kernel, bias, *, activation, dtype):
    return causal_conv(
        x, state, kernel, bias, activation=activation, dtype=dtype, backend="pallas_gpu_transpose", interpret=True
    )


@pytest.mark.parametrize("mode", ["f32", "bf16"])
@pytest.mark.parametrize(
    "kernel_size, use_bias, activation", [(1, True, "silu"), (2, False, None), (3, True, None), (4, True, "silu")]
)
def test_causal_conv_pallas_gpu_transpose_matches_reference(mode, kernel_size, use_bias, activation):
    """backend="pallas_gpu_transpose" (XLA's dz, then the backward kernel for dx, d kernel and d bias): y, new state
    and every gradient; S = 13 and C = 6 ragged for the default tiles."""
    x, state, kernel, bias = make_inputs(mode, 2, 13, 6, kernel_size, use_bias, key=20 + kernel_size)
    compare(mode, x, state, kernel, bias, activation, fn=transpose_conv)


@pytest.mark.parametrize("seq_len", [1, 2])
def test_pallas_gpu_transpose_with_sequences_shorter_than_the_state(seq_len):
    x, state, kernel, bias = make_inputs("f32", 2, seq_len, 3, 4, True, key=seq_len)
    compare("f32", x, state, kernel, bias, "silu", fn=transpose_conv)


@pytest.mark.parametrize("seq_len", [1, 2])
def test_sequences_shorter_than_the_state(seq_len):
    """S < kernel_size - 1: every tap of the first rows reads the state; d state gets all of them."""
    x, state, kernel, bias = make_inputs("f32", 2, seq_len, 3, 4, True, key=seq_len)
    compare("f32", x, state, kernel, bias, "silu")


def test_under_vmap():
    """An extra leading axis mapped by jax.vmap (the kernels get a batched grid)."""
    x, state, kernel, bias = make_inputs("f32", 2, 6, 4, 4, True)
    xs = jnp.stack([x, 2 * x])
    states = jnp.stack([state, -state])
    compare("f32", xs, states, kernel, bias, "silu", transform=lambda f: jax.vmap(f, in_axes=(0, 0, None, None)))


def test_inside_shard_map():
    """Inside a caller's shard_map (check_vma=False: the Pallas interpreter does not track varying axes)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = (P("data"), P("data"), P(), P())

    def sharded(x, state, kernel, bias, *, activation, dtype):
        def run(*args):
            return fused_conv(*args, activation=activation, dtype=dtype)

        return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=(P("data"), P("data")), check_vma=False)(
            x, state, kernel, bias
        )

    x, state, kernel, bias = make_inputs("f32", 2, 9, 5, 4, True, key=3)
    compare("f32", x, state, kernel, bias, "silu", fn=sharded)


@pytest.mark.parametrize("backend, kernels", [("pallas_gpu", 2), ("pallas_gpu_transpose", 1)])
@pytest.mark.parametrize("kernel_size", [1, 4])
def test_lowers_for_cuda_inside_a_check_vma_shard_map(kernel_size, backend, kernels):
    """The kernels' outputs carry the inputs' varying manual axes: the gradient lowers for CUDA inside a
    ``check_vma=True`` shard_map with replicated state and parameters ("pallas_gpu": both kernels are Triton custom
    calls; "pallas_gpu_transpose": the backward one)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, state, kernel, bias = make_inputs("bf16", 2, 9, 5, kernel_size, True, key=4)

    def loss(x, state, kernel, bias):
        def run(*args):
            y, _ = causal_conv(*args, activation="silu", dtype=jnp.bfloat16, backend=backend)
            return jnp.sum(y.astype(jnp.float32) ** 2)[None]

        sharded = jax.shard_map(run, mesh=mesh, in_specs=(P("data"), P(), P(), P()), out_specs=P("data"))
        return jnp.sum(sharded(x, state, kernel, bias))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, state, kernel, bias)
    with cuda_lowering_without_a_gpu():
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "causal_conv_backward" in text and ("causal_conv_forward" in text) == (kernels == 2)


def test_auto_backend_is_jnp_unless_the_environment_asks_for_the_kernels(monkeypatch):
    """ "auto" is "jnp" until the kernels are timed on the H200; M2RNN_JAX_CONV_BACKEND=pallas_gpu makes it pick them
    on NVIDIA GPUs for supported dtypes."""
    from m2rnn_jax.layers import conv

    x, state, kernel, bias = make_inputs("f32", 1, 4, 3, 2, False)
    inputs = (x, state, kernel, bias)
    monkeypatch.delenv(conv.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(conv, "on_nvidia_gpu", lambda: True)
    assert resolve_conv_backend("auto", inputs, jnp.float32) == "jnp"
    monkeypatch.setenv(conv.BACKEND_ENV_VAR, "pallas_gpu")
    assert resolve_conv_backend("auto", inputs, jnp.float32) == "pallas_gpu"
    assert resolve_conv_backend("auto", inputs, np.float64) == "jnp"
    assert resolve_conv_backend("jnp", inputs, jnp.float32) == "jnp"  # an explicit backend wins
    monkeypatch.setattr(conv, "on_nvidia_gpu", lambda: False)
    assert resolve_conv_backend("auto", inputs, jnp.float32) == "jnp"
    assert resolve_conv_backend("pallas_gpu", inputs, jnp.float32) == "pallas_gpu"
    monkeypatch.setattr(conv, "on_nvidia_gpu", lambda: True)
    monkeypatch.setenv(conv.BACKEND_ENV_VAR, "pallas_gpu_transpose")
    assert resolve_conv_backend("auto", inputs, jnp.float32) == "pallas_gpu_transpose"
    assert resolve_conv_backend("auto", inputs, np.float64) == "jnp"
    monkeypatch.setenv(conv.BACKEND_ENV_VAR, "triton")
    with pytest.raises(ValueError, match="M2RNN_JAX_CONV_BACKEND: expected one of"):
        resolve_conv_backend("auto", inputs, jnp.float32)


def test_bad_arguments_raise():
    x, state, kernel, bias = make_inputs("f32", 1, 4, 3, 2, True)
    with pytest.raises(ValueError, match="backend: expected one of"):
        causal_conv(x, state, kernel, bias, activation=None, dtype=jnp.float32, backend="cuda")
    with pytest.raises(ValueError, match="x: expected dtype bfloat16, float16 or float32, got float64"):
        causal_conv_forward(np.zeros(x.shape), state, kernel, bias, activation=None, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="out_dtype: expected"):
        causal_conv_forward(x, state, kernel, bias, activation=None, out_dtype=np.float64)
    with pytest.raises(ValueError, match=r"state: expected shape \(1, 1, 3\)"):
        causal_conv_forward(x, state[:, :0], kernel, bias, activation=None, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"dy: expected shape"):
        causal_conv_backward(x, state, kernel, bias, x[:, :2], activation=None)
    with pytest.raises(ValueError, match="block_c: expected a power of two, got 48"):
        ConvKernelConfig(block_c=48)
    with pytest.raises(ValueError, match="num_warps: expected a positive int"):
        ConvKernelConfig(num_warps=0)


def test_default_config_shrinks_to_small_inputs():
    assert default_config(4096, 2048) == ConvKernelConfig(block_s=32, block_c=128, blocks_per_program=1)
    assert default_config(4096, 2048, backward=True) == ConvKernelConfig(16, 128, blocks_per_program=32, num_warps=4)
    assert default_config(40, 20, backward=True) == ConvKernelConfig(16, 32, blocks_per_program=3, num_warps=1)
    assert default_config(1, 3, backward=True) == ConvKernelConfig(1, 4, blocks_per_program=1, num_warps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_gpu_transpose"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-7)])
def test_compiled_kernels_match_reference_on_gpu(backend, dtype, tol):
    """The GDN qkv conv's shape per sequence (S = 4096, C = 2048, 4 taps, SiLU) plus a bias and a state."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4096, 2048)), dtype)
    state = jnp.asarray(rng.standard_normal((2, 3, 2048)), dtype)
    kernel = jnp.asarray(0.3 * rng.standard_normal((4, 2048)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(2048), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x.shape), dtype)

    def outputs(fn, **backend):
        run = lambda *args: fn(*args, activation="silu", dtype=dtype, **backend)[0]
        y, vjp = jax.vjp(run, x, state, kernel, bias)
        return (y, *vjp(dy))

    fused = jax.jit(lambda: outputs(causal_conv, backend=backend))()
    expected = jax.jit(lambda: outputs(causal_conv_reference))()
    for name, actual, wanted in zip(("y", "dx", "dstate", "dkernel", "dbias"), fused, expected, strict=True):
        wanted = np.asarray(wanted, np.float64)
        scale = max(1.0, float(np.max(np.abs(wanted))))
        np.testing.assert_allclose(np.asarray(actual, np.float64), wanted, rtol=tol, atol=tol * scale, err_msg=name)


def check_on_a_mesh() -> None:
    """Under ``jax.set_mesh`` of 8 devices (data 4 x tensor 2), inputs split over both: the kernels run in a
    shard_map (an opaque Pallas call would otherwise gather its inputs on the GPU); values and every gradient
    equal the reference's (raises AssertionError otherwise)."""
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, state, kernel, bias = make_inputs("f32", 8, 11, 6, 4, True, key=8)
    split = jax.sharding.NamedSharding(mesh, P("data", None, "tensor"))
    x, state = jax.device_put(x, split), jax.device_put(state, split)
    with jax.set_mesh(mesh):
        for fn in (fused_conv, transpose_conv):
            jaxpr = jax.make_jaxpr(lambda *args, fn=fn: fn(*args, activation="silu", dtype=jnp.float32))
            assert "shard_map" in str(jaxpr(x, state, kernel, bias)), "the kernels ran outside a shard_map"
            compare("f32", x, state, kernel, bias, "silu", fn=fn)
    print("mesh check passed")


def test_under_a_mesh_on_fake_devices():
    from tests.parallel.fake_devices import run_on_fake_devices

    assert run_on_fake_devices("tests.kernels.test_causal_conv_gpu")[-1] == "mesh check passed"


if __name__ == "__main__":
    check_on_a_mesh()
