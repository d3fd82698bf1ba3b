"""`embed_tokens`: the decoder's lookup equals `nnx.Embed`'s rows, keeps the table's gradient in its own dtype
(float32 sums of repeated ids, not bf16), and gives NaN rows for out-of-range ids like `nnx.Embed`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.models.decoder import embed_tokens


def _embed() -> nnx.Embed:
    return nnx.Embed(50, 8, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_rows_equal_nnx_embed():
    embed = _embed()
    ids = jnp.array([[0, 3, 3, 49], [7, 7, 7, 1]])
    ours = embed_tokens(embed.embedding[...], ids, jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(embed(ids), np.float32))


def test_gradient_is_a_float32_sum_over_repeated_ids():
    table = _embed().embedding[...]
    ids = jnp.array([[5] * 300 + [2]])
    cotangent = jnp.full((1, 301, 8), 1.0 + 2.0**-7, jnp.bfloat16)  # 300 bf16 additions would round
    _, pullback = jax.vjp(lambda t: embed_tokens(t, ids, jnp.bfloat16), table)
    (grad,) = pullback(cotangent)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grad[5]), 300 * (1.0 + 2.0**-7), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[2]), 1.0 + 2.0**-7, rtol=1e-6)
    assert float(jnp.abs(grad).sum()) == float(jnp.abs(grad[5]).sum() + jnp.abs(grad[2]).sum())


def test_out_of_range_ids_give_nan_rows():
    rows = embed_tokens(_embed().embedding[...], jnp.array([[1, 50]]), jnp.float32)
    assert np.isfinite(np.asarray(rows[0, 0])).all() and np.isnan(np.asarray(rows[0, 1])).all()
