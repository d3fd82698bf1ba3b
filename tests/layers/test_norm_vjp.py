"""The custom-VJP RMSNorm (``rms_norm``) against autodiff of the plain formula (``rms_norm_reference``).

Values and the gradients of x and scale for float64 / float32 / bf16 inputs with float32 scales (and float32 input
with a bf16 output), 2-D, 3-D and the GDN per-head 4-D shape, under ``jax.jit`` and ``jax.vmap``, through the layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.layers import RMSNorm
from m2rnn_jax.layers.norm import rms_norm, rms_norm_reference

# (x dtype, scale dtype, output dtype, tolerance of dx and y, tolerance of d scale (a float32 reduction over rows))
MODES = {
    "f64": (jnp.float64, jnp.float64, jnp.float64, 1e-12, 1e-12),
    "f32": (jnp.float32, jnp.float32, jnp.float32, 1e-6, 1e-6),
    "bf16": (jnp.bfloat16, jnp.float32, jnp.bfloat16, 2**-7, 1e-6),
    "f32_in_bf16_out": (jnp.float32, jnp.float32, jnp.bfloat16, 2**-7, 1e-6),
}


def assert_close(actual: jax.Array, expected: jax.Array, tol: float, name: str) -> None:
    """Equal dtypes and shapes, values within ``tol`` (relative, and relative to the largest value)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    expected, actual = np.asarray(expected).astype(np.float64), np.asarray(actual).astype(np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(expected)))))


def make_inputs(mode: str, shape: tuple[int, ...], key: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x, scale, dy) in the mode's dtypes; x with a per-row spread of magnitudes."""
    x_dtype, scale_dtype, out_dtype, _, _ = MODES[mode]
    rng = np.random.default_rng(key)
    magnitudes = np.exp(rng.uniform(-2.0, 2.0, shape[:-1] + (1,)))
    x = jnp.asarray(magnitudes * rng.standard_normal(shape), x_dtype)
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(shape[-1]), scale_dtype)
    dy = jnp.asarray(rng.standard_normal(shape), out_dtype)
    return x, scale, dy


def values_and_gradients(norm_fn, x, scale, dy, *, eps, dtype):
    y, vjp = jax.vjp(lambda x, scale: norm_fn(x, scale, eps=eps, dtype=dtype), x, scale)
    return y, vjp(dy)


def check_against_reference(mode: str, x, scale, dy, *, eps: float = 1e-5, transform=lambda f: f) -> None:
    """Both functions under ``jax.jit(transform(...))``; y, dx, d scale within the mode's tolerances."""
    _, _, dtype, tol, scale_tol = MODES[mode]
    results = [
        jax.jit(transform(lambda x, scale, dy, fn=fn: values_and_gradients(fn, x, scale, dy, eps=eps, dtype=dtype)))(
            x, scale, dy
        )
        for fn in (rms_norm, rms_norm_reference)
    ]
    (y, (dx, dscale)), (expected_y, (expected_dx, expected_dscale)) = results
    assert_close(y, expected_y, tol, "y")
    assert_close(dx, expected_dx, tol, "dx")
    assert_close(dscale, expected_dscale, scale_tol, "dscale")


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16), (2, 3, 2, 8)])
def test_values_and_gradients_match_reference_under_jit(x64, mode, shape):
    x, scale, dy = make_inputs(mode, shape)
    check_against_reference(mode, x, scale, dy)


def test_eps_dominates_small_inputs(x64):
    """Rows far below sqrt(eps): the eps term in r must also enter the backward."""
    x, scale, dy = make_inputs("f64", (4, 8), key=3)
    check_against_reference("f64", 1e-4 * x, scale, dy, eps=1e-2)


def test_under_vmap(x64):
    """An extra leading axis mapped by jax.vmap, the scale shared."""
    x, scale, dy = make_inputs("f64", (3, 2, 4, 8), key=4)
    check_against_reference("f64", x, scale, dy, transform=lambda f: jax.vmap(f, in_axes=(0, None, 0)))


@pytest.mark.parametrize("mode", ["f64", "bf16"])
def test_layer_gradients(x64, mode):
    """nnx.grad through the layer equals autodiff of the plain formula on its scale."""
    x_dtype, scale_dtype, dtype, tol, scale_tol = MODES[mode]
    norm = RMSNorm(8, eps=1e-5, dtype=dtype, param_dtype=scale_dtype, scale_sharding=None)
    x, scale, _ = make_inputs(mode, (2, 3, 8), key=5)
    norm.scale[...] = scale
    weights = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, 8)), jnp.float32)

    @nnx.jit
    def layer_loss(norm, x):
        return jnp.sum(norm(x).astype(jnp.float32) * weights)

    @jax.jit
    def reference_loss(scale, x):
        return jnp.sum(rms_norm_reference(x, scale, eps=1e-5, dtype=dtype).astype(jnp.float32) * weights)

    value, (grads, dx) = nnx.value_and_grad(layer_loss, argnums=(0, 1))(norm, x)
    expected, (expected_dscale, expected_dx) = jax.value_and_grad(reference_loss, argnums=(0, 1))(scale, x)
    assert_close(value, expected, tol, "loss")
    assert_close(dx, expected_dx, tol, "dx")
    assert_close(grads.scale[...], expected_dscale, scale_tol, "dscale")


def test_forward_values_are_the_reference_bitwise():
    """The custom-VJP forward is the plain formula (both under jax.jit)."""
    x, scale, _ = make_inputs("bf16", (3, 4, 32), key=7)
    run = jax.jit(rms_norm, static_argnames=("eps", "dtype"))
    run_reference = jax.jit(rms_norm_reference, static_argnames=("eps", "dtype"))
    np.testing.assert_array_equal(
        run(x, scale, eps=1e-5, dtype=jnp.bfloat16), run_reference(x, scale, eps=1e-5, dtype=jnp.bfloat16)
    )


def test_inside_shard_map_with_a_replicated_scale():
    """check_vma=True: x varies over the mesh axis, the scale does not; its gradient is summed over the axis."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, scale, dy = make_inputs("f32", (4, 3, 16), key=8)

    def loss(fn, x, scale):
        return jnp.sum(fn(x, scale, eps=1e-5, dtype=jnp.float32) * dy)

    sharded = jax.shard_map(
        lambda x, scale: rms_norm(x, scale, eps=1e-5, dtype=jnp.float32),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
        check_vma=True,
    )
    grads = jax.jit(jax.grad(lambda x, scale: jnp.sum(sharded(x, scale) * dy), argnums=(0, 1)))(x, scale)
    expected = jax.jit(jax.grad(lambda x, scale: loss(rms_norm_reference, x, scale), argnums=(0, 1)))(x, scale)
    for name, actual, wanted in zip(("dx", "dscale"), grads, expected, strict=True):
        assert_close(actual, wanted, 1e-6, name)
