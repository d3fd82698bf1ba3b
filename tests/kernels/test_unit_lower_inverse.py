"""The chunk inverse's kernels (pallas_kernels/gpu/unit_lower_inverse.py) against XLA's triangular solve.

Interpret mode on any platform: (I + A)⁻¹ and the gradient of a loss through it against autodiff of the triangular
solve, for leading dims of any rank and chunk sizes 16..64; bad shapes and dtypes raise. Marked ``gpu``: the
compiled kernels at the GDN presets' size (C = 64) at full float32 and at TF32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops.gated_delta_rule.chunked import triangular_inverse
from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import fused_unit_lower_inverse
from m2rnn_jax.testing import relative_error
from pallas_kernels.gpu.unit_lower_inverse import unit_lower_inverse_backward, unit_lower_inverse_forward

HIGHEST = jax.lax.Precision.HIGHEST


def random_lower(shape: tuple[int, ...], seed: int = 0, scale: float = 0.3) -> jax.Array:
    """A float32 (..., C, C) with random entries everywhere: the kernels must read only the strictly lower part."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def reference_value_and_gradient(A: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    strict = jnp.tril(A, -1)
    T, vjp = jax.vjp(triangular_inverse, strict)
    (dA,) = vjp(weights)
    return T, jnp.tril(dA, -1)


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 1, 3, 32, 32), (64, 64)])
def test_interpret_matches_triangular_solve_and_its_gradient(shape):
    A, weights = random_lower(shape, 0), random_lower(shape, 1, 1.0)
    T_expected, dA_expected = reference_value_and_gradient(A, weights)
    T = unit_lower_inverse_forward(A, precision=HIGHEST, interpret=True)
    dA = unit_lower_inverse_backward(T, weights, precision=HIGHEST, interpret=True)
    assert T.shape == dA.shape == shape and T.dtype == dA.dtype == jnp.float32
    assert relative_error(T, T_expected) < 1e-5
    assert relative_error(dA, dA_expected) < 1e-5
    assert not np.any(np.triu(np.asarray(dA)))  # nothing flows to the unused upper part


def test_custom_vjp_gradient_under_jit_and_vmap():
    A, weights = random_lower((2, 3, 16, 16), 2), random_lower((2, 3, 16, 16), 3, 1.0)
    loss = lambda a: jnp.sum(fused_unit_lower_inverse(a, HIGHEST, True) * weights[0])
    grads = jax.jit(jax.vmap(jax.grad(loss)))(A)
    for index in range(A.shape[0]):
        _, expected = reference_value_and_gradient(A[index], weights[0])
        assert relative_error(grads[index], expected) < 1e-5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"A: expected shape \(..., C, C\) with C a power of two >= 16"):
        unit_lower_inverse_forward(jnp.zeros((2, 24, 24)), interpret=True)
    with pytest.raises(ValueError, match="A: expected shape"):
        unit_lower_inverse_forward(jnp.zeros((2, 16, 32)), interpret=True)
    with pytest.raises(ValueError, match="A: expected float32, got bfloat16"):
        unit_lower_inverse_forward(jnp.zeros((16, 16), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match="dT: expected float32 of shape"):
        unit_lower_inverse_backward(jnp.zeros((16, 16)), jnp.zeros((2, 16, 16)), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [(HIGHEST, 1e-5), (jax.lax.Precision.DEFAULT, 2e-2)])
def test_compiled_matches_triangular_solve_on_gpu(precision, tol):
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    A, weights = random_lower((8, 2, 64, 64, 64), 4, 0.1), random_lower((8, 2, 64, 64, 64), 5, 1.0)
    with jax.default_matmul_precision("highest"):
        T_expected, dA_expected = jax.jit(reference_value_and_gradient)(A, weights)
    T = jax.jit(lambda a: unit_lower_inverse_forward(a, precision=precision))(A)
    dA = jax.jit(lambda t, w: unit_lower_inverse_backward(t, w, precision=precision))(T, weights)
    assert relative_error(T, T_expected) < tol and relative_error(dA, dA_expected) < tol
