"""The chunk-local stage of the gated delta rule in one kernel (pallas_kernels/gpu/gdn_chunk_factors.py).

On CPU the kernel runs in Pallas interpret mode against the XLA form
(:func:`m2rnn_jax.ops.gated_delta_rule.chunked.local_factors` with the block-doubling inverse at the same
precision); the whole backend with ``local="fused"`` against ``local="xla"`` and the recurrent reference, forward and
every gradient, is in tests/ops/test_gated_delta_rule.py. The compiled GPU test of
the backend with this stage fused is in tests/kernels/test_gdn_gpu.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops.chunking import chunk_decays, split_chunks
from m2rnn_jax.ops.gated_delta_rule.chunked import HIGHEST, local_factors, to_chunks, unit_lower_inverse
from m2rnn_jax.testing import random_gdn_inputs, relative_error
from pallas_kernels.gpu.gdn_chunk_factors import (
    FactorsBackwardKernelConfig,
    FactorsKernelConfig,
    chunk_factors_backward,
    chunk_factors_forward,
)


def chunked_inputs(dtype, chunk=16, seq_len=48, k_dim=16, v_dim=64):
    x = random_gdn_inputs(5, 2, seq_len, 2, k_dim, v_dim, dtype=dtype, reset_rate=0.1)
    q, k, v = (split_chunks(x[n], chunk) for n in ("q", "k", "v"))  # (B, n, C, H, ...): the kernel's layout
    beta, log_alpha = (to_chunks(x[n].astype(jnp.float32), chunk) for n in ("beta", "log_alpha"))
    decay, start, end, _ = chunk_decays(log_alpha, to_chunks(x["reset"][..., None], chunk))
    return q, k, v, beta, decay, start, end


@pytest.mark.parametrize(
    "dtype, precision, tol", [(jnp.float32, HIGHEST, 1e-5), (jnp.bfloat16, jax.lax.Precision.DEFAULT, 1e-2)]
)
@pytest.mark.parametrize("block_v", [16, 64])
def test_kernel_matches_the_xla_local_factors_in_interpret_mode(dtype, precision, tol, block_v):
    inputs = chunked_inputs(dtype)
    *factors, T = chunk_factors_forward(
        *inputs, precision=precision, config=FactorsKernelConfig(block_v=block_v), interpret=True
    )
    reference = local_factors(
        *inputs, inverse=functools.partial(unit_lower_inverse, precision=precision), dot_dtype=dtype
    )
    for name, got, ref in zip(("U", "Wk", "Kd", "Qd", "QK"), factors, reference):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert relative_error(got.astype(jnp.float32), ref.astype(jnp.float32)) < tol, name
    _, k, _, beta, decay, *_ = inputs
    k = jnp.moveaxis(k, 3, 1).astype(jnp.float32)  # (B, H, n, C, K)
    steps = jnp.arange(k.shape[-2])
    kk = jnp.einsum("...tk,...ik->...ti", k, k, precision=HIGHEST)
    A = jnp.where(steps[:, None] > steps[None, :], beta[..., :, None] * kk * decay, 0.0)
    eye = jnp.eye(k.shape[-2])
    assert T.dtype == jnp.float32
    assert relative_error(jnp.einsum("...ti,...ij->...tj", eye + A, T, precision=HIGHEST), eye + 0 * A) < tol


def test_kernel_takes_resets_through_the_decay_weights():
    """A chunk with a reset: pairwise weights across it are 0, so T is block diagonal there (exactly, in float32)."""
    q, k, v, beta, decay, start, end = chunked_inputs(jnp.float32)
    mask = decay == 0.0
    assert bool(jnp.any(mask & (jnp.arange(16)[:, None] > jnp.arange(16)[None, :])))  # some reset inside a chunk
    *_, QK, T = chunk_factors_forward(q, k, v, beta, decay, start, end, precision=HIGHEST, interpret=True)
    below = jnp.arange(16)[:, None] > jnp.arange(16)[None, :]
    assert not np.any(np.asarray(QK)[np.asarray(mask)])
    assert not np.any(np.asarray(T)[np.asarray(mask & below)])


def test_bad_kernel_config_raises():
    with pytest.raises(ValueError, match="block_v: expected a power of two >= 16"):
        FactorsKernelConfig(block_v=48)
    with pytest.raises(ValueError, match="num_warps: expected a positive int"):
        FactorsKernelConfig(num_warps=0)


@pytest.mark.parametrize(
    "dtype, precision, tol", [(jnp.float32, HIGHEST, 1e-6), (jnp.bfloat16, jax.lax.Precision.DEFAULT, 1e-2)]
)
@pytest.mark.parametrize("block_k, block_v", [(16, 16), (64, 64)])
def test_backward_kernel_matches_autodiff_of_the_xla_factors_in_interpret_mode(dtype, precision, tol, block_k, block_v):
    """dq, dk, dv (token-major) and the cotangents of beta, the decay weights, start and end against jax.vjp of
    local_factors (the kernel's T as the inverse's value), for random cotangents of all five factors; K = 32 and
    V = 64 walked in one or several blocks, resets inside chunks."""
    inputs = chunked_inputs(dtype, k_dim=32)
    *factors, T = chunk_factors_forward(*inputs, precision=precision, interpret=True)
    rng = np.random.default_rng(3)
    cotangents = tuple(jnp.asarray(rng.standard_normal(f.shape), f.dtype) for f in factors)
    local = functools.partial(
        local_factors, inverse=functools.partial(unit_lower_inverse, precision=HIGHEST), dot_dtype=dtype
    )
    expected = jax.vjp(local, *inputs)[1](cotangents)
    config = FactorsBackwardKernelConfig(block_k=block_k, block_v=block_v)
    got = chunk_factors_backward(*inputs, T, cotangents, precision=precision, config=config, interpret=True)
    names = ("dq", "dk", "dv", "dbeta", "ddecay", "dstart", "dend")
    for name, g, ref, x in zip(names, got, expected, inputs):
        assert g.shape == x.shape and g.dtype == (x.dtype if name in ("dq", "dk", "dv") else jnp.float32), name
        assert relative_error(g.astype(jnp.float32), ref.astype(jnp.float32)) < tol, name


def test_backward_kernel_argument_checks():
    inputs = chunked_inputs(jnp.float32)
    *factors, T = chunk_factors_forward(*inputs, precision=HIGHEST, interpret=True)
    with pytest.raises(ValueError, match=r"dQK: expected shape \(2, 2, 3, 16, 16\)"):
        chunk_factors_backward(*inputs, T, (*factors[:4], factors[4][..., :8]), precision=HIGHEST, interpret=True)
    with pytest.raises(ValueError, match=r"T: expected shape"):
        chunk_factors_backward(*inputs, T[:1], tuple(factors), precision=HIGHEST, interpret=True)
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16, got 24"):
        FactorsBackwardKernelConfig(block_k=24)
