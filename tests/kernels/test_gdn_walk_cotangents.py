"""The walk's parallel input cotangents in one kernel (pallas_kernels/gpu/gdn_walk_cotangents.py).

On CPU the kernel runs in Pallas interpret mode against the einsums and the reduction of the XLA backward
(``_fused_backward`` of m2rnn_jax/ops/gated_delta_rule/pallas_gpu.py); the whole backend with
``walk_cotangents="fused"`` against ``"xla"`` and the recurrent reference, every gradient, is in
tests/ops/test_gated_delta_rule.py. The compiled GPU test of
the backend with this stage fused is in tests/kernels/test_gdn_gpu.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from m2rnn_jax.ops.gated_delta_rule.chunked import HIGHEST
from m2rnn_jax.testing import relative_error
from pallas_kernels.gpu.gdn_walk_cotangents import WalkCotangentsKernelConfig, walk_input_cotangents

B, H, N, C, K, V = 2, 3, 2, 16, 64, 64


def walk_results(dtype, seed=0):
    """dw, w (B, H, n, C, V) and starts, g_next (B, H, n, K, V) in ``dtype``."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = ((B, H, N, C, V), (B, H, N, K, V), (B, H, N, C, V), (B, H, N, K, V))
    return tuple(jax.random.normal(key, shape).astype(dtype) for key, shape in zip(keys, shapes))


def expected(dw, starts, w, g_next):
    """-dW Sᵀ, W Gᵀ, <G, S> in float32 from the same operands."""
    dw, starts, w, g_next = (x.astype(jnp.float32) for x in (dw, starts, w, g_next))
    product = lambda a, b: jnp.einsum("...cv,...kv->...ck", a, b, precision=HIGHEST)  # noqa: E731
    return -product(dw, starts), product(w, g_next), jnp.sum(g_next * starts, axis=(-2, -1))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("block_k, block_v", [(16, 16), (32, 64), (128, 64)])
def test_kernel_matches_the_xla_cotangents_in_interpret_mode(dtype, tol, block_k, block_v):
    """Several row blocks (da summed over them), several column blocks (the loop), or one of each."""
    inputs = walk_results(dtype)
    config = WalkCotangentsKernelConfig(block_k=block_k, block_v=block_v)
    got = walk_input_cotangents(*inputs, config=config, interpret=True)
    for name, g, ref, want_dtype in zip(("dWk", "dKd", "da"), got, expected(*inputs), (dtype, dtype, jnp.float32)):
        assert g.shape == ref.shape and g.dtype == want_dtype, name
        assert relative_error(g.astype(jnp.float32), ref) < (1e-5 if name == "da" else tol), name


def test_bad_arguments_raise():
    dw, starts, w, g_next = walk_results(jnp.float32)
    with pytest.raises(ValueError, match=r"g_next: expected shape \(2, 3, 2, 64, 64\)"):
        walk_input_cotangents(dw, starts, w, g_next[..., :32, :], interpret=True)
    with pytest.raises(ValueError, match=r"dw: expected shape \(2, 3, 2, 16, 64\)"):
        walk_input_cotangents(dw[..., :8, :], starts, w, g_next, interpret=True)
    with pytest.raises(ValueError, match="dw, starts, w, g_next: expected one dtype"):
        walk_input_cotangents(dw, starts.astype(jnp.bfloat16), w, g_next, interpret=True)
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16, got 48"):
        WalkCotangentsKernelConfig(block_k=48)
    with pytest.raises(ValueError, match="block_v: expected a power of two >= 16"):
        WalkCotangentsKernelConfig(block_v=8)
