"""The causal depthwise conv with the sequence split over a ``context`` axis (halo exchange) == the single-device
layer: outputs, the new conv state and the gradients of x, the state and the parameters, for context = 2, 4, 8 and
context x data, with documents whose boundaries fall inside the halo and on shard boundaries (8 fake CPU devices,
one subprocess: :mod:`tests.parallel.context_harness`).
"""

from __future__ import annotations

import functools

import pytest

from tests.parallel.context_harness import assert_sharded_matches, context_mesh, main, run_checks

GLOBAL_LENGTH = 48
CHANNELS = 5


def _segment_ids(batch: int, rng):
    """Documents of random lengths, with starts on shard boundaries (24: every mesh; 18: context 8), inside the halo
    of the next shard (10: positions 9-11 are the kernel-4 halo of the shard starting at 12, context 4 and 8), and
    ids that repeat (A B A), which an equality test alone would merge."""
    import numpy as np

    starts = rng.uniform(size=(batch, GLOBAL_LENGTH)) < 0.1
    starts[:, 24] = starts[:, 18] = starts[:, 10] = True
    ids = np.cumsum(starts, axis=1) % 2  # ids repeat: only changes start documents
    return ids.astype(np.int32)


def check_conv(
    dtype_name: str,
    context: int,
    data: int = 1,
    *,
    kernel_size: int = 4,
    with_state: bool = True,
    with_documents: bool = False,
    check_vma: bool = True,
) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.layers.conv import CausalDepthwiseConv1d
    from m2rnn_jax.parallel.context.conv import context_causal_conv

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(context + 10 * data + kernel_size)
    batch = 2 * data
    conv = CausalDepthwiseConv1d(
        CHANNELS,
        kernel_size,
        activation="silu",
        use_bias=True,
        initializer_range=0.5,
        dtype=dtype,
        param_dtype=dtype,
        rngs=nnx.Rngs(context),
    )
    graphdef, params = nnx.split(conv)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)  # bias != 0
    args = {
        "x": jnp.asarray(rng.standard_normal((batch, GLOBAL_LENGTH, CHANNELS)), dtype),
        "state": jnp.asarray(rng.standard_normal((batch, kernel_size - 1, CHANNELS)), dtype) if with_state else None,
        "params": params,
        "segment_ids": jnp.asarray(_segment_ids(batch, rng)) if with_documents else None,
    }
    seq, rows = P("data", "context"), P("data")

    def sharded(x, state, params, segment_ids):
        def body(x, state, params, segment_ids):
            return context_causal_conv(nnx.merge(graphdef, params), x, state, segment_ids=segment_ids)

        specs = (seq, None if state is None else rows, P(), None if segment_ids is None else seq)
        return jax.shard_map(
            body, mesh=context_mesh(context, data), in_specs=specs, out_specs=(seq, rows), check_vma=check_vma
        )(x, state, params, segment_ids)

    def single(x, state, params, segment_ids):
        return nnx.merge(graphdef, params)(x, state, segment_ids=segment_ids)

    assert_sharded_matches(sharded, single, args, tol=1e-10 if dtype == jnp.float64 else 1e-5)


FAST = {
    "conv_float64_context2": functools.partial(check_conv, "float64", 2),
    "conv_float64_context8_documents": functools.partial(check_conv, "float64", 8, with_documents=True),
    "conv_float32_context4_data2_no_state": functools.partial(check_conv, "float32", 4, 2, with_state=False),
}
SLOW = {
    "conv_float64_context4_documents_no_state": functools.partial(
        check_conv, "float64", 4, with_state=False, with_documents=True
    ),
    "conv_float64_context8_kernel7": functools.partial(check_conv, "float64", 8, kernel_size=7),
    "conv_float64_context2_data4_documents": functools.partial(check_conv, "float64", 2, 4, with_documents=True),
    "conv_float32_context8_kernel1": functools.partial(check_conv, "float32", 8, kernel_size=1),
    "conv_float64_context4_documents_check_vma_off": functools.partial(
        check_conv, "float64", 4, with_documents=True, check_vma=False
    ),
}


@pytest.fixture(scope="module")
def fast_results() -> dict[str, str]:
    return run_checks(__name__, list(FAST))


@pytest.mark.parametrize("name", list(FAST))
def test_context_conv_matches_single_device(fast_results, name):
    assert fast_results[name] == "OK", fast_results[name]


@pytest.mark.slow
def test_context_conv_sweep_matches_single_device():
    results = run_checks(__name__, list(SLOW))
    failed = {name: text for name, text in results.items() if text != "OK"}
    assert not failed, "\n".join(f"{name}: {text}" for name, text in failed.items())


def test_short_shards_and_unbound_axis_are_rejected():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.parallel.context.conv import context_conv_state

    x = jnp.ones((1, 2, 3))
    with pytest.raises(ValueError, match="axis_name: expected a mesh axis bound by an enclosing jax.shard_map"):
        context_conv_state(x, kernel_size=2)
    mesh = jax.make_mesh((1,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    short = jax.shard_map(
        functools.partial(context_conv_state, kernel_size=4), mesh=mesh, in_specs=P(None, "context"), out_specs=P()
    )
    with pytest.raises(ValueError, match=r"x: expected a local sequence length >= kernel_size - 1 = 3"):
        short(x)


if __name__ == "__main__":
    main({**FAST, **SLOW})
