"""Gated delta rule and SSD with the sequence split over a ``context`` axis == the single-device op.

On 8 fake CPU devices (one subprocess, :mod:`tests.parallel.context_harness`): outputs, final states and the
gradient of every input (h0 included) for context = 2, 4, 8 and context x data, with and without h0, with document
resets (some at shard boundaries), grouped SSD heads; float64 to 1e-10, float32 to 1e-5 (relative).
"""

from __future__ import annotations

import functools

import pytest

from tests.parallel.context_harness import assert_sharded_matches, context_mesh, main, run_checks

GLOBAL_LENGTH = 48  # local lengths 24 / 12 / 6: not multiples of the chunk length 5 used below
CHUNK = 5


def _random_gdn(dtype, *, seed: int, batch: int, with_h0: bool, reset_rate: float):

    from m2rnn_jax.testing import random_gdn_inputs

    inputs = random_gdn_inputs(seed, batch, GLOBAL_LENGTH, heads=2, k_dim=6, v_dim=5, reset_rate=reset_rate)
    args = {name: inputs[name].astype(dtype) for name in ("q", "k", "v", "beta", "log_alpha", "h0")}
    args["h0"] = args["h0"] if with_h0 else None
    if reset_rate > 0:  # a document start exactly at the first shard boundary of every mesh
        args["reset"] = inputs["reset"].at[:, GLOBAL_LENGTH // 2].set(True).at[:, GLOBAL_LENGTH // 8].set(True)
    else:
        args["reset"] = None
    return args


def check_gdn(
    dtype_name: str,
    context: int,
    data: int = 1,
    *,
    with_h0: bool = True,
    reset_rate: float = 0.0,
    backend: str = "chunked",
    check_vma: bool = True,
) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.ops import gated_delta_rule
    from m2rnn_jax.parallel.context.linear_recurrence import context_gated_delta_rule

    dtype = jnp.dtype(dtype_name)
    args = _random_gdn(dtype, seed=context + 10 * data, batch=2 * data, with_h0=with_h0, reset_rate=reset_rate)
    op = dict(chunk_size=CHUNK, backend=backend)
    seq, state = P("data", "context"), P("data")

    def sharded(q, k, v, beta, log_alpha, h0, reset):
        body = functools.partial(context_gated_delta_rule, axis_name="context", **op)
        specs = (seq, seq, seq, seq, seq, None if h0 is None else state, None if reset is None else seq)
        run = jax.shard_map(
            lambda *a: body(*a[:6], reset=a[6]),
            mesh=context_mesh(context, data),
            in_specs=specs,
            out_specs=(seq, state),
            check_vma=check_vma,
        )
        return run(q, k, v, beta, log_alpha, h0, reset)

    def single(q, k, v, beta, log_alpha, h0, reset):
        return gated_delta_rule(q, k, v, beta, log_alpha, h0, reset=reset, chunk_size=CHUNK, backend="chunked")

    assert_sharded_matches(sharded, single, args, tol=1e-10 if dtype == jnp.float64 else 1e-5)


def _random_ssd(dtype, *, seed: int, batch: int, heads: int, groups: int, with_h0: bool, with_reset: bool):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    head_dim, state_size = 3, 4
    dt = np.logaddexp(0.0, rng.standard_normal((batch, GLOBAL_LENGTH, heads)) - 1.0)
    A = -rng.uniform(0.5, 4.0, heads)
    args = {
        "x": rng.standard_normal((batch, GLOBAL_LENGTH, heads, head_dim)),
        "dt": dt,
        "log_decay": dt * A,
        "B": rng.standard_normal((batch, GLOBAL_LENGTH, groups, state_size)),
        "C": rng.standard_normal((batch, GLOBAL_LENGTH, groups, state_size)),
        "h0": rng.standard_normal((batch, heads, head_dim, state_size)) * 0.3 if with_h0 else None,
    }
    args = {name: None if a is None else jnp.asarray(a, dtype) for name, a in args.items()}
    reset = None
    if with_reset:
        reset = rng.uniform(size=(batch, GLOBAL_LENGTH)) < 0.05
        reset[:, GLOBAL_LENGTH // 2] = reset[:, GLOBAL_LENGTH // 8] = True
        reset[:, 0] = False
        reset = jnp.asarray(reset)
    return {**args, "reset": reset}


def check_ssd(
    dtype_name: str,
    context: int,
    data: int = 1,
    *,
    heads: int = 2,
    groups: int = 1,
    with_h0: bool = True,
    with_reset: bool = False,
    check_vma: bool = True,
) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.ops import ssd
    from m2rnn_jax.parallel.context.linear_recurrence import context_ssd

    dtype = jnp.dtype(dtype_name)
    args = _random_ssd(
        dtype,
        seed=context + 10 * data,
        batch=2 * data,
        heads=heads,
        groups=groups,
        with_h0=with_h0,
        with_reset=with_reset,
    )
    seq, state = P("data", "context"), P("data")

    def sharded(x, dt, log_decay, B, C, h0, reset):
        body = functools.partial(context_ssd, chunk_size=CHUNK, backend="chunked", axis_name="context")
        specs = (seq, seq, seq, seq, seq, None if h0 is None else state, None if reset is None else seq)
        run = jax.shard_map(
            lambda *a: body(*a[:6], reset=a[6]),
            mesh=context_mesh(context, data),
            in_specs=specs,
            out_specs=(seq, state),
            check_vma=check_vma,
        )
        return run(x, dt, log_decay, B, C, h0, reset)

    def single(x, dt, log_decay, B, C, h0, reset):
        return ssd(x, dt, log_decay, B, C, h0, reset=reset, chunk_size=CHUNK, backend="chunked")

    assert_sharded_matches(sharded, single, args, tol=1e-10 if dtype == jnp.float64 else 1e-5)


FAST = {
    "gdn_float64_context2": functools.partial(check_gdn, "float64", 2),
    "gdn_float64_context8_resets": functools.partial(check_gdn, "float64", 8, reset_rate=0.05),
    "gdn_float32_context4_data2_no_h0": functools.partial(check_gdn, "float32", 4, 2, with_h0=False),
    "gdn_float64_context4_resets_check_vma_off": functools.partial(
        check_gdn, "float64", 4, reset_rate=0.05, check_vma=False
    ),
    "ssd_float64_context2": functools.partial(check_ssd, "float64", 2),
    "ssd_float64_context8_groups_resets": functools.partial(
        check_ssd, "float64", 8, heads=4, groups=2, with_reset=True
    ),
    "ssd_float32_context4_data2_no_h0": functools.partial(check_ssd, "float32", 4, 2, with_h0=False),
}
SLOW = {
    **{
        f"gdn_float64_context{c}_resets_no_h0": functools.partial(
            check_gdn, "float64", c, with_h0=False, reset_rate=0.1
        )
        for c in (2, 4)
    },
    "gdn_float64_context2_data4_recurrent_backend": functools.partial(check_gdn, "float64", 2, 4, backend="recurrent"),
    "gdn_float32_context8_resets": functools.partial(check_gdn, "float32", 8, reset_rate=0.05),
    **{
        f"ssd_float64_context{c}_data2_resets": functools.partial(check_ssd, "float64", c, 2, with_reset=True)
        for c in (2, 4)
    },
    "ssd_float64_context8_no_h0": functools.partial(check_ssd, "float64", 8, with_h0=False),
    "ssd_float32_context8_groups": functools.partial(check_ssd, "float32", 8, heads=4, groups=2),
    "ssd_float64_context4_resets_check_vma_off": functools.partial(
        check_ssd, "float64", 4, with_reset=True, check_vma=False
    ),
}


@pytest.fixture(scope="module")
def fast_results() -> dict[str, str]:
    return run_checks(__name__, list(FAST))


@pytest.mark.parametrize("name", list(FAST))
def test_context_linear_recurrence_matches_single_device(fast_results, name):
    assert fast_results[name] == "OK", fast_results[name]


@pytest.mark.slow
def test_context_linear_recurrence_sweep_matches_single_device():
    results = run_checks(__name__, list(SLOW))
    failed = {name: text for name, text in results.items() if text != "OK"}
    assert not failed, "\n".join(f"{name}: {text}" for name, text in failed.items())


def test_unbound_axis_name_is_rejected():
    import jax.numpy as jnp

    from m2rnn_jax.parallel.context.linear_recurrence import context_gated_delta_rule, context_ssd

    q = jnp.ones((1, 4, 1, 2))
    with pytest.raises(ValueError, match="axis_name: expected a mesh axis bound by an enclosing jax.shard_map"):
        context_gated_delta_rule(q, q, q, jnp.ones((1, 4, 1)), -jnp.ones((1, 4, 1)))
    with pytest.raises(ValueError, match="axis_name: expected a mesh axis name"):
        context_ssd(q, jnp.ones((1, 4, 1)), -jnp.ones((1, 4, 1)), q, q, chunk_size=2, axis_name=None)


if __name__ == "__main__":
    main({**FAST, **SLOW})
