"""Causal attention with the sequence split over a ``context`` axis (ring and all-gather) == one-device attention:
outputs and the gradients of q, k, v for context = 2, 4, 8 and context x data, with GQA, RoPE at global positions
(with a cache offset) and document masks across shard boundaries. The one-device truth is the layer's computation:
``jax.nn.dot_product_attention`` (XLA) in float32, an all-float64 softmax in float64 (8 fake CPU devices, one
subprocess: :mod:`tests.parallel.context_harness`).
"""

from __future__ import annotations

import functools
import re

import pytest

from tests.parallel.context_harness import assert_sharded_matches, context_mesh, main, run_checks

GLOBAL_LENGTH = 48
HEAD_DIM = 6


def _one_device_attention(q, k, v, segment_ids, *, rope_theta, start):
    """Attention on the whole sequence as the layer computes it (RoPE at start + t, causal, document mask)."""
    import jax
    import jax.numpy as jnp

    from m2rnn_jax.layers.documents import document_index
    from m2rnn_jax.layers.rope import apply_rope

    batch, seq_len, num_heads, head_dim = q.shape
    if rope_theta is not None:
        positions = start + jnp.arange(seq_len)
        q, k = apply_rope(q, positions, rope_theta), apply_rope(k, positions, rope_theta)
    allowed = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))[None]
    if segment_ids is not None:
        documents = document_index(segment_ids, batch, seq_len)
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")
    group = num_heads // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bsnd,btnd->bnst", q, k) * head_dim**-0.5
    weights = jax.nn.softmax(jnp.where(allowed[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnst,btnd->bsnd", weights, v)


def check_attention(
    dtype_name: str,
    context: int,
    data: int = 1,
    *,
    method: str,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float | None = 100.0,
    start: int = 0,
    with_documents: bool = False,
    check_vma: bool = True,
) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.parallel.context.attention import context_causal_attention

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(context + 10 * data)
    batch = 2 * data
    args = {
        "q": jnp.asarray(rng.standard_normal((batch, GLOBAL_LENGTH, num_heads, HEAD_DIM)), dtype),
        "k": jnp.asarray(rng.standard_normal((batch, GLOBAL_LENGTH, num_kv_heads, HEAD_DIM)), dtype),
        "v": jnp.asarray(rng.standard_normal((batch, GLOBAL_LENGTH, num_kv_heads, HEAD_DIM)), dtype),
        "segment_ids": None,
    }
    if with_documents:  # starts on the shard boundaries 24 and 18, inside shards, and repeating ids (A B A)
        starts = rng.uniform(size=(batch, GLOBAL_LENGTH)) < 0.08
        starts[:, 24] = starts[:, 18] = starts[:, 10] = True
        args["segment_ids"] = jnp.asarray(np.cumsum(starts, axis=1) % 2, jnp.int32)
    seq = P("data", "context")

    def sharded(q, k, v, segment_ids):
        body = functools.partial(context_causal_attention, rope_theta=rope_theta, start=start, method=method)
        specs = (seq, seq, seq, None if segment_ids is None else seq)
        return jax.shard_map(
            lambda q, k, v, ids: body(q, k, v, segment_ids=ids),
            mesh=context_mesh(context, data),
            in_specs=specs,
            out_specs=seq,
            check_vma=check_vma,
        )(q, k, v, segment_ids)

    single = functools.partial(_one_device_attention, rope_theta=rope_theta, start=start)
    assert_sharded_matches(sharded, single, args, tol=1e-10 if dtype == jnp.float64 else 1e-5)


FAST = {
    "ring_float64_context8_documents": functools.partial(
        check_attention, "float64", 8, method="ring", with_documents=True
    ),
    "all_gather_float64_context2_offset": functools.partial(
        check_attention, "float64", 2, method="all_gather", start=5
    ),
    "ring_float32_context4_data2_nope": functools.partial(
        check_attention, "float32", 4, 2, method="ring", rope_theta=None
    ),
}
SLOW = {
    "ring_float64_context2_mha": functools.partial(check_attention, "float64", 2, method="ring", num_kv_heads=4),
    "ring_float64_context4_offset": functools.partial(check_attention, "float64", 4, method="ring", start=7),
    "all_gather_float64_context8_documents": functools.partial(
        check_attention, "float64", 8, method="all_gather", with_documents=True
    ),
    "all_gather_float32_context4_data2_mqa": functools.partial(
        check_attention, "float32", 4, 2, method="all_gather", num_kv_heads=1
    ),
    "ring_float32_context2_data4_documents": functools.partial(
        check_attention, "float32", 2, 4, method="ring", with_documents=True
    ),
    **{
        f"{method}_float64_context4_documents_check_vma_off": functools.partial(
            check_attention, "float64", 4, method=method, with_documents=True, check_vma=False
        )
        for method in ("ring", "all_gather")
    },
}


@pytest.fixture(scope="module")
def fast_results() -> dict[str, str]:
    return run_checks(__name__, list(FAST))


@pytest.mark.parametrize("name", list(FAST))
def test_context_attention_matches_single_device(fast_results, name):
    assert fast_results[name] == "OK", fast_results[name]


@pytest.mark.slow
def test_context_attention_sweep_matches_single_device():
    results = run_checks(__name__, list(SLOW))
    failed = {name: text for name, text in results.items() if text != "OK"}
    assert not failed, "\n".join(f"{name}: {text}" for name, text in failed.items())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="zigzag"), "method: expected one of ['ring', 'all_gather'], got 'zigzag'"),
        (dict(k_heads=3), "k: expected a head count Nkv that divides Nq = 4, got 3"),
        (dict(segment_length=5), "segment_ids: expected shape (B, S) = (1, 4), got (1, 5)"),
    ],
)
def test_bad_arguments_are_rejected(change, message):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.parallel.context.attention import context_causal_attention

    q = jnp.ones((1, 4, 4, 2))
    k = jnp.ones((1, 4, change.get("k_heads", 2), 2))
    ids = jnp.zeros((1, change.get("segment_length", 4)), jnp.int32)
    mesh = jax.make_mesh((1,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    body = functools.partial(context_causal_attention, method=change.get("method", "ring"))
    run = jax.shard_map(lambda q, k, ids: body(q, k, k, segment_ids=ids), mesh=mesh, in_specs=P(), out_specs=P())
    with pytest.raises(ValueError, match=re.escape(message)):
        run(q, k, ids)


if __name__ == "__main__":
    main({**FAST, **SLOW})
