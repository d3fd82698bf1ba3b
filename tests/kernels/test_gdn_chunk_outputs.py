"""The output stage of the gated delta rule and its backward as kernels (pallas_kernels/gpu/gdn_chunk_outputs.py).

On CPU the kernels run in Pallas interpret mode against the einsum form of
:func:`m2rnn_jax.ops.gated_delta_rule.chunked.xla_outputs` and its autodiff; the whole backend with
``outputs="fused"`` against ``outputs="xla"`` and the recurrent reference, forward and every gradient, is in
tests/ops/test_gated_delta_rule.py. The compiled GPU test of
the backend with this stage fused is in tests/kernels/test_gdn_gpu.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops.gated_delta_rule.chunked import xla_outputs
from m2rnn_jax.testing import relative_error
from pallas_kernels.gpu.gdn_chunk_outputs import OutputsKernelConfig, chunk_outputs_backward, chunk_outputs_forward

B, H, N, C, K, V = 2, 3, 2, 16, 32, 64


def factors(dtype, seed=0):
    """Qd (B, H, n, C, K), QK (B, H, n, C, C) float32 (lower triangular, as the op's), starts, w in ``dtype``."""
    keys = jax.random.split(jax.random.key(seed), 4)
    Qd = jax.random.normal(keys[0], (B, H, N, C, K)).astype(dtype)
    QK = jnp.tril(jax.random.normal(keys[1], (B, H, N, C, C)))
    starts = jax.random.normal(keys[2], (B, H, N, K, V)).astype(dtype)
    w = jax.random.normal(keys[3], (B, H, N, C, V)).astype(dtype)
    return Qd, QK, starts, w


def reference(Qd, QK, starts, w):
    """The XLA output stage in float32 from the same operands (QK rounded to the product dtype first)."""
    dot_dtype = Qd.dtype
    return xla_outputs(
        *(x.astype(jnp.float32) for x in (Qd, QK.astype(dot_dtype), starts, w)), jnp.float32, dot_dtype=jnp.float32
    )


SMALL = OutputsKernelConfig(block_v=16)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("block_v", [16, 64])
def test_forward_matches_the_xla_outputs_in_interpret_mode(dtype, tol, block_v):
    Qd, QK, starts, w = factors(dtype)
    o = chunk_outputs_forward(
        Qd, QK, starts, w, out_dtype=dtype, config=OutputsKernelConfig(block_v=block_v), interpret=True
    )
    expected = reference(Qd, QK, starts, w)
    assert o.shape == (B, N, C, H, V) and o.dtype == dtype  # token-major: (B, S, H, V) split into chunks
    assert relative_error(o.astype(jnp.float32), expected) < tol


def test_forward_writes_the_output_dtype_asked_for():
    o = chunk_outputs_forward(*factors(jnp.bfloat16), out_dtype=jnp.float32, config=SMALL, interpret=True)
    assert o.dtype == jnp.float32


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("block_v", [(16, 16), (64, 32)])
def test_backward_matches_autodiff_of_the_xla_outputs_in_interpret_mode(dtype, tol, block_v):
    """dQd, dQK, dstarts, dw against jax.vjp of the float32 einsums at the same operands and cotangent."""
    inputs = factors(dtype, seed=1)
    do = jnp.asarray(np.random.default_rng(2).standard_normal((B, N, C, H, V)), dtype)
    _, pullback = jax.vjp(lambda *a: reference(*a), *(x.astype(jnp.float32) for x in inputs))
    expected = pullback(do.astype(jnp.float32))
    state_config, factor_config = (OutputsKernelConfig(block_v=b) for b in block_v)
    got = chunk_outputs_backward(*inputs, do, state_config=state_config, factor_config=factor_config, interpret=True)
    for name, x, g, ref in zip(("dQd", "dQK", "dstarts", "dw"), inputs, got, expected):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert relative_error(g.astype(jnp.float32), ref) < tol, name


def test_bad_arguments_raise():
    Qd, QK, starts, w = factors(jnp.float32)
    with pytest.raises(ValueError, match=r"starts: expected shape \(2, 3, 2, 32, 64\)"):
        chunk_outputs_forward(Qd, QK, starts[..., :16, :], w, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"QK: expected shape \(2, 3, 2, 16, 16\)"):
        chunk_outputs_forward(Qd, QK[..., :8], starts, w, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="Qd, starts, w: expected one dtype"):
        chunk_outputs_forward(Qd, QK, starts.astype(jnp.bfloat16), w, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"do: expected shape \(B, n, C, H, V\) = \(2, 2, 16, 3, 64\)"):
        chunk_outputs_backward(Qd, QK, starts, w, jnp.zeros((B, H, N, C, V)), interpret=True)
    with pytest.raises(ValueError, match="block_v: expected a power of two >= 16"):
        OutputsKernelConfig(block_v=24)
