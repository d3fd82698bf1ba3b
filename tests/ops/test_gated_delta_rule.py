"""The gated delta rule op: chunked vs recurrent vs a float64 NumPy loop, resets vs separate documents, the
pallas_gpu backend in interpret mode (forward and every gradient), the chunk inverse, argument checks."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops import gated_delta_rule
from m2rnn_jax.ops.gated_delta_rule.chunked import triangular_inverse, unit_lower_inverse
from m2rnn_jax.ops.gated_delta_rule.op import resolve_backend
from m2rnn_jax.testing import jaxpr_equations, random_gdn_inputs, relative_error

ARGS = ("q", "k", "v", "beta", "log_alpha", "h0")


def numpy_gated_delta_rule(q, k, v, beta, log_alpha, h0, reset):
    """The recurrence written out per (sequence, head, step) in float64."""
    q, k, v, beta, log_alpha, h0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, log_alpha, h0))
    batch, seq_len, heads, _ = q.shape
    o = np.zeros((batch, seq_len, heads, v.shape[-1]))
    final = np.zeros_like(h0)
    for b in range(batch):
        for h in range(heads):
            state = h0[b, h].copy()
            for t in range(seq_len):
                if reset is not None and reset[b, t]:
                    state = np.zeros_like(state)
                state = np.exp(log_alpha[b, t, h]) * state
                w = beta[b, t, h] * (v[b, t, h] - k[b, t, h] @ state)
                state = state + np.outer(k[b, t, h], w)
                o[b, t, h] = state.T @ q[b, t, h]
            final[b, h] = state
    return o, final


def inputs64(seed, reset_rate=0.2, **dims):
    sizes = dict(batch=2, seq_len=13, heads=3, k_dim=5, v_dim=4) | dims
    x = random_gdn_inputs(seed, **sizes, reset_rate=reset_rate)
    return {n: (x[n] if x[n] is None or n == "reset" else x[n].astype(jnp.float64)) for n in x}


@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
@pytest.mark.parametrize("chunk_size, reset_rate, with_h0", [(4, 0.2, True), (32, 0.0, False), (1, 0.3, True)])
def test_reference_backends_match_numpy_float64(x64, backend, chunk_size, reset_rate, with_h0):
    x = inputs64(chunk_size, reset_rate)
    h0 = x["h0"] if with_h0 else None
    o, final = gated_delta_rule(*(x[n] for n in ARGS[:5]), h0, reset=x["reset"], chunk_size=chunk_size, backend=backend)
    o_np, final_np = numpy_gated_delta_rule(
        *(x[n] for n in ARGS[:5]),
        x["h0"] if with_h0 else np.zeros_like(x["h0"]),
        None if x["reset"] is None else np.asarray(x["reset"]),
    )
    assert o.dtype == jnp.float64 and final.dtype == jnp.float64
    np.testing.assert_allclose(o, o_np, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final, final_np, rtol=1e-10, atol=1e-12)


def _loss(backend, reset, chunk_size, weights, **kwargs):
    def loss(*args):
        o, final = gated_delta_rule(*args, reset=reset, chunk_size=chunk_size, backend=backend, **kwargs)
        return jnp.sum(o * weights) + jnp.sum(final * jnp.cos(final))

    return loss


@pytest.mark.parametrize("chunk_size", [4, 32])
def test_chunked_gradients_match_recurrent_float64(x64, chunk_size):
    x = inputs64(10 + chunk_size, reset_rate=0.25)
    args = tuple(x[n] for n in ARGS)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 13, 3, 4)))
    grads = [
        jax.jit(jax.grad(_loss(b, x["reset"], chunk_size, weights), argnums=tuple(range(6))))(*args)
        for b in ("recurrent", "chunked")
    ]
    for name, g_rec, g_chk in zip(ARGS, *grads):
        np.testing.assert_allclose(g_chk, g_rec, rtol=1e-9, atol=1e-10, err_msg=name)


def test_reset_equals_running_documents_separately(x64):
    x = inputs64(3, reset_rate=0.0, batch=1, seq_len=17)
    starts = [0, 5, 6, 12]  # documents [0, 5), [5, 6), [6, 12), [12, 17)
    reset = np.zeros((1, 17), bool)
    reset[0, starts[1:]] = True
    run = jax.jit(lambda *a, reset=None: gated_delta_rule(*a, reset=reset, chunk_size=4, backend="chunked"))
    o, final = run(*(x[n] for n in ARGS), reset=jnp.asarray(reset))
    pieces, state = [], x["h0"]
    for lo, hi in zip(starts, starts[1:] + [17]):
        part = [x[n][:, lo:hi] for n in ARGS[:5]]
        o_part, state = run(*part, state if lo == 0 else jnp.zeros_like(state))
        pieces.append(o_part)
    np.testing.assert_allclose(o, jnp.concatenate(pieces, axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final, state, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "seq_len, reset_rate, with_h0",
    [(40, 0.1, True), (16, 0.0, False)],  # 40: two full chunks of 16 + a ragged one; 16: one chunk, no h0
)
def test_pallas_gpu_interpret_matches_recurrent_with_gradients(seq_len, reset_rate, with_h0):
    x = random_gdn_inputs(seq_len, 2, seq_len, 2, 16, 32, reset_rate=reset_rate)
    if reset_rate:
        x["reset"] = x["reset"].at[0, 17].set(True)  # a reset on a chunk boundary's neighbour, at least one
    h0 = x["h0"] if with_h0 else None
    args = tuple(x[n] for n in ARGS[:5]) + (h0,)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((2, seq_len, 2, 32)), jnp.float32)
    argnums = tuple(range(6)) if with_h0 else tuple(range(5))
    results = []
    for backend, kwargs in (("recurrent", {}), ("pallas_gpu", {"interpret": True})):
        loss = _loss(backend, x["reset"], 16, weights, **kwargs)
        value = gated_delta_rule(*args, reset=x["reset"], chunk_size=16, backend=backend, **kwargs)
        results.append((value, jax.jit(jax.grad(loss, argnums=argnums))(*args)))
    (o_ref, f_ref), g_ref = results[0]
    (o, f), g = results[1]
    assert relative_error(o, o_ref) < 1e-5 and relative_error(f, f_ref) < 1e-5
    for name, a, b in zip(ARGS, g, g_ref):
        assert relative_error(a, b) < 1e-5, name


def test_pallas_gpu_interpret_under_vmap_equals_each_slice():
    # compare --stack-seeds vmaps the train step over a leading seed axis: the kernels run batched (pallas_call's
    # batching rule adds a grid axis), forward and backward.
    slices = [random_gdn_inputs(seed, 1, 24, 2, 16, 16) for seed in (11, 12)]
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((1, 24, 2, 16)), jnp.float32)
    loss = _loss("pallas_gpu", None, 16, weights, interpret=True)
    value_and_grad = jax.value_and_grad(loss, argnums=tuple(range(6)))
    stacked = jax.jit(jax.vmap(value_and_grad))(*(jnp.stack([x[n] for x in slices]) for n in ARGS))
    for index, x in enumerate(slices):
        expected = jax.jit(value_and_grad)(*(x[n] for n in ARGS))
        for name, a, b in zip(("loss",) + ARGS, jax.tree.leaves(stacked), jax.tree.leaves(expected)):
            assert relative_error(a[index], b) < 1e-5, name


def test_pallas_gpu_interpret_bf16_inputs_close_to_float32():
    x = random_gdn_inputs(5, 1, 24, 2, 16, 16, dtype=jnp.bfloat16, reset_rate=0.1)
    args = tuple(x[n] for n in ARGS)
    o, final = gated_delta_rule(*args, reset=x["reset"], chunk_size=16, backend="pallas_gpu", interpret=True)
    o_ref, final_ref = gated_delta_rule(*(a.astype(jnp.float32) for a in args), reset=x["reset"], backend="recurrent")
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert relative_error(o, o_ref) < 2e-2 and relative_error(final, final_ref) < 2e-2


@pytest.mark.parametrize("precision", [jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT])
def test_doubling_inverse_matches_triangular_solve(precision):
    A = jnp.tril(jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32)), jnp.float32), -1) * 0.5
    tol = 1e-5 if precision == jax.lax.Precision.HIGHEST else 2e-2  # DEFAULT may be TF32 on GPUs
    assert relative_error(unit_lower_inverse(A, precision), triangular_inverse(A)) < tol
    with pytest.raises(ValueError, match="power-of-two"):
        unit_lower_inverse(jnp.zeros((24, 24)))


def test_output_dtypes_and_auto_on_cpu():
    x = random_gdn_inputs(0, 1, 5, 1, 4, 3, dtype=jnp.bfloat16)
    o, final = gated_delta_rule(*(x[n] for n in ARGS[:5]))
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32 and final.shape == (1, 1, 4, 3)
    if jax.devices()[0].platform == "cpu":
        assert resolve_backend("auto", 16, 16, 16, jnp.bfloat16) == "chunked"
    assert resolve_backend("recurrent", 5, 3, 7, jnp.float64) == "recurrent"


def test_bad_arguments_raise():
    x = random_gdn_inputs(0, 1, 6, 2, 4, 3)
    q, k, v, beta, log_alpha, h0 = (x[n] for n in ARGS)
    cases = [
        (dict(q=q[0]), "q: expected shape \\(B, S, H, K\\)"),
        (dict(k=k[:, :5]), "k: expected shape"),
        (dict(v=v[:, :, :1]), "v: expected shape"),
        (dict(v=v.astype(jnp.bfloat16)), "q, k, v: expected one dtype"),
        (dict(beta=beta[..., :1]), "beta: expected shape"),
        (dict(log_alpha=log_alpha.astype(jnp.int32)), "log_alpha: expected a floating-point array"),
        (dict(h0=h0[..., :2]), "h0: expected shape"),
        (dict(reset=jnp.zeros((1, 6), jnp.int32)), "reset: expected a bool array"),
        (dict(chunk_size=0), "chunk_size: expected a positive int"),
        (dict(backend="fast"), "backend: expected one of"),
        (dict(backend="chunked", interpret=True), "interpret: True needs backend 'pallas_gpu'"),
        (dict(backend="pallas_gpu"), "K \\(q.shape\\[-1\\]\\): expected a power of two >= 16"),
    ]
    base = dict(q=q, k=k, v=v, beta=beta, log_alpha=log_alpha, h0=h0)
    for change, message in cases:
        kw = base | change
        args = [kw.pop(n) for n in ARGS]
        with pytest.raises(ValueError, match=message):
            gated_delta_rule(*args, **kw)


def test_doubling_inverse_gradient_matches_triangular_solve_autodiff():
    rng = np.random.default_rng(4)
    A = jnp.tril(jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32), -1) * 0.5
    weights = jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32)

    def gradient(inverse):
        return jax.grad(lambda a: jnp.sum(inverse(a) * weights))(A)

    grads = [gradient(unit_lower_inverse), gradient(triangular_inverse)]
    assert relative_error(grads[0], jnp.tril(grads[1], -1)) < 1e-5
    assert not np.any(np.triu(np.asarray(grads[0])))  # A is strictly lower: nothing flows elsewhere


_MESH_SCRIPT = """
import jax, jax.numpy as jnp
from m2rnn_jax.ops import gated_delta_rule
from m2rnn_jax.testing import random_gdn_inputs, relative_error
x = random_gdn_inputs(0, 2, 20, 2, 16, 16, reset_rate=0.1)
args = [x[n] for n in ("q", "k", "v", "beta", "log_alpha", "h0")]
def loss(backend, **kw):
    def f(*a):
        o, h = gated_delta_rule(*a, reset=x["reset"], chunk_size=16, backend=backend, **kw)
        return jnp.sum(o * o) + jnp.sum(h)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5))
jax.set_mesh(jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)))
fused = jax.jit(loss("pallas_gpu", interpret=True))
assert "shard_map" in str(jax.make_jaxpr(fused)(*args))
(v1, g1), (v2, g2) = fused(*args), jax.jit(loss("recurrent"))(*args)
assert relative_error(v1, v2) < 1e-5, (v1, v2)
assert all(relative_error(a, b) < 1e-5 for a, b in zip(g1, g2))
from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu
def fused_loss(*a):
    o, h = gated_delta_rule_pallas_gpu(
        *a,
        x["reset"],
        chunk_size=16,
        interpret=True,
        local="fused",
        local_backward="fused",
        outputs="fused",
        walk_cotangents="fused",
    )
    return jnp.sum(o * o) + jnp.sum(h)
fused_local = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1, 2, 3, 4, 5)))
assert str(jax.make_jaxpr(fused_local)(*args)).count("shard_map") >= 3  # the factors', the walk's and the outputs'
v3, g3 = fused_local(*args)
assert relative_error(v3, v2) < 1e-5 and all(relative_error(a, b) < 1e-5 for a, b in zip(g3, g2))
print("ok")
"""


def test_pallas_gpu_runs_per_shard_under_a_mesh():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _dot_operand_types(jaxpr) -> list[tuple]:
    """(dtype, shape) pairs of the operands of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    return [tuple((v.aval.dtype, v.aval.shape) for v in eqn.invars) for eqn in jaxpr_equations(jaxpr, "dot_general")]


@pytest.fixture
def xla_stages(monkeypatch):
    """The backend's "xla" stages by default (FUSED_BY_DEFAULT empty): the tests of what XLA's form of the chunk
    products, outputs and cotangents looks like."""
    from m2rnn_jax.ops.gated_delta_rule import pallas_gpu

    monkeypatch.setattr(pallas_gpu, "FUSED_BY_DEFAULT", frozenset())


def test_pallas_gpu_backward_transposes_no_chunk_product(xla_stages):
    """The chunk products' cotangents come out of their dot_generals in the operands' own layout: no transpose of
    the last two dims after a product (einsum's autodiff gave (..., V, K) / (..., V, C) and transposed them: 13.6 ms
    of the 400M 1L hybrid's H200 step). Only the (C, C) chunk inverse's gradient may swap axes (the inverse's
    kernel does it in registers: no transpose at all here)."""
    x = random_gdn_inputs(0, 1, 32, 1, 32, 64, dtype=jnp.bfloat16)  # C=16, K=32, V=64: the shapes tell them apart

    def loss(*args):
        o, final = gated_delta_rule(*args, chunk_size=16, backend="pallas_gpu", interpret=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(*(x[n] for n in ARGS)).jaxpr
    swaps = [
        eqn.outvars[0].aval.shape
        for eqn in jaxpr_equations(jaxpr, "transpose")
        if tuple(eqn.params["permutation"][-2:])
        == (len(eqn.params["permutation"]) - 1, len(eqn.params["permutation"]) - 2)
    ]
    assert all(shape[-2:] == (16, 16) for shape in swaps), swaps


def test_pallas_gpu_bf16_gradient_products_take_bf16_operands(xla_stages):
    """Float32 products in the bf16 backward ran as float32 FFMA gemms on the H200 (run 3 profile); only the
    (C, C) chunk inverse and its gradient are meant to be float32."""
    x = random_gdn_inputs(0, 1, 32, 1, 32, 64, dtype=jnp.bfloat16)  # K, V != C: (C, C) products stand out

    def loss(*args):
        o, final = gated_delta_rule(*args, chunk_size=16, backend="pallas_gpu", interpret=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(*(x[n] for n in ARGS)).jaxpr
    dots = _dot_operand_types(jaxpr)
    assert any(all(d == jnp.bfloat16 for d, _ in ops) for ops in dots)
    wide = [ops for ops in dots if any(d != jnp.bfloat16 for d, _ in ops)]
    assert all(shape[-2:] == (16, 16) for ops in wide for _, shape in ops), wide


@pytest.mark.parametrize("dtype, stored", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_pallas_gpu_output_is_stored_in_the_input_dtype(xla_stages, dtype, stored):
    """bf16 inputs: o goes through an optimization barrier in bf16 before the transpose back to (B, S, H, V), and its
    cotangent likewise (the GPU compiler otherwise stored the float32 sum of the two output products); float32
    inputs: no barrier. (The chunked reference computes in float32 throughout and narrows nothing.)"""
    x = random_gdn_inputs(0, 1, 32, 1, 16, 32, dtype=dtype)  # (B, H, n, C, V) = (1, 1, 2, 16, 32)

    def loss(*args):
        o, final = gated_delta_rule(*args, chunk_size=16, backend="pallas_gpu", interpret=True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*(x[n] for n in ARGS)).jaxpr
    barriers = jaxpr_equations(jaxpr, "optimization_barrier")
    operands = [[(v.aval.dtype, v.aval.shape) for v in eqn.invars] for eqn in barriers]
    assert operands == ([[(jnp.bfloat16, (1, 1, 2, 16, 32))]] * 2 if stored else [])


@pytest.mark.parametrize("chunk_size, stages", [(16, 2), (64, 2), (128, 1)])
def test_pallas_gpu_walk_kernels_take_the_chunk_lengths_pipeline_stages(chunk_size, stages):
    """Chunks of 128 need one pipeline stage in the walk kernels (two overflow an H100/H200's shared memory:
    311-319 KB at K=256 bf16); shorter chunks keep the measured two. Forward and backward walk both."""
    x = random_gdn_inputs(0, 1, 130, 1, 16, 32, dtype=jnp.bfloat16)

    def loss(*args):
        o, final = gated_delta_rule(*args, chunk_size=chunk_size, backend="pallas_gpu", interpret=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1))(*(x[n] for n in ARGS)).jaxpr
    walks = {
        eqn.params["name"]: eqn.params["compiler_params"]
        for eqn in jaxpr_equations(jaxpr, "pallas_call")
        if eqn.params["name"].startswith("gdn_chunk_states")
    }
    assert sorted(walks) == ["gdn_chunk_states_backward", "gdn_chunk_states_forward"]
    assert {params.num_stages for params in walks.values()} == {stages}
    assert walks["gdn_chunk_states_backward"].num_warps == 8


def test_pallas_gpu_interpret_with_128_token_chunks_matches_recurrent():
    """The long-chunk launch configuration (one stage) computes the same walk: 130 tokens = one chunk of 128 + 2."""
    x = random_gdn_inputs(3, 1, 130, 2, 16, 32, reset_rate=0.02)
    args = tuple(x[n] for n in ARGS)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((1, 130, 2, 32)), jnp.float32)
    results = []
    for backend, kwargs in (("recurrent", {}), ("pallas_gpu", {"interpret": True})):
        value = gated_delta_rule(*args, reset=x["reset"], chunk_size=128, backend=backend, **kwargs)
        grads = jax.jit(jax.grad(_loss(backend, x["reset"], 128, weights, **kwargs), argnums=tuple(range(6))))(*args)
        results.append((value, grads))
    ((o_ref, f_ref), g_ref), ((o, f), g) = results
    assert relative_error(o, o_ref) < 1e-5 and relative_error(f, f_ref) < 1e-5
    for name, a, b in zip(ARGS, g, g_ref):
        assert relative_error(a, b) < 1e-5, name


FUSED_STAGES = [
    {"local": "fused"},
    {"local": "fused", "local_backward": "fused"},
    {"outputs": "fused"},
    {"walk_cotangents": "fused"},
    {"local": "fused", "local_backward": "fused", "outputs": "fused", "walk_cotangents": "fused"},
]


@pytest.mark.parametrize("stages", FUSED_STAGES, ids=lambda s: "+".join(s))
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_pallas_gpu_fused_stages_match_the_xla_ones(stages, dtype, tol):
    """local="fused" (the chunk-local stage in one kernel, its backward through the kernel's T), outputs="fused"
    (the output products and their cotangents in kernels, token-major O and dO) and walk_cotangents="fused" (dWk,
    dKd, da in one kernel) against the XLA stages around the inverse kernel, in interpret mode: outputs, final state
    and every gradient (ragged S = 40, resets, h0 given; a cotangent on the final state too)."""
    from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu

    x = random_gdn_inputs(11, 2, 40, 2, 16, 32, dtype=dtype, reset_rate=0.1)
    args = tuple(x[n].astype(jnp.float32) if n in ("beta", "log_alpha", "h0") else x[n] for n in ARGS)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((2, 40, 2, 32)), jnp.float32)
    results = {}
    for name, chosen in (("xla", {}), ("fused", stages)):

        def loss(*a, chosen=chosen):
            o, final = gated_delta_rule_pallas_gpu(*a, x["reset"], chunk_size=16, interpret=True, **chosen)
            return jnp.sum(o.astype(jnp.float32) * weights) + jnp.sum(final * jnp.cos(final))

        results[name] = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))(*args)
    (value, grads), (value_ref, grads_ref) = results["fused"], results["xla"]
    assert relative_error(value, value_ref) < tol
    for name, a, b in zip(ARGS, grads, grads_ref):
        assert relative_error(a.astype(jnp.float32), b.astype(jnp.float32)) < tol, name


@pytest.mark.parametrize("stages", FUSED_STAGES, ids=lambda s: "+".join(s))
def test_pallas_gpu_fused_stages_match_recurrent_float32(stages):
    from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu

    x = random_gdn_inputs(12, 1, 37, 2, 16, 32, reset_rate=0.1)
    args = tuple(x[n] for n in ARGS)
    o, final = gated_delta_rule_pallas_gpu(*args, x["reset"], chunk_size=16, interpret=True, **stages)
    o_ref, final_ref = gated_delta_rule(*args, reset=x["reset"], backend="recurrent")
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert relative_error(o, o_ref) < 1e-5 and relative_error(final, final_ref) < 1e-5


def test_pallas_gpu_fused_stage_argument_checks():
    from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu

    x = random_gdn_inputs(0, 1, 16, 1, 16, 16)
    args = tuple(x[n] for n in ARGS)
    with pytest.raises(ValueError, match=r"local: expected one of \['xla', 'fused'\], got 'kernel'"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, interpret=True, local="kernel")
    with pytest.raises(ValueError, match="inverse: the fused local factors invert inside their kernel"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, interpret=True, local="fused", inverse="doubling")
    with pytest.raises(ValueError, match="local: 'fused' takes bfloat16 or float16 inputs on the GPU"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, local="fused")  # float32, compiled
    with pytest.raises(ValueError, match=r"outputs: expected one of \['xla', 'fused'\], got 'kernel'"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, interpret=True, outputs="kernel")
    with pytest.raises(ValueError, match="outputs: 'fused' takes bfloat16 or float16 inputs on the GPU"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, outputs="fused")  # float32, compiled
    with pytest.raises(ValueError, match=r"local_backward: expected one of \['xla', 'fused'\], got 'yes'"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, interpret=True, local="fused", local_backward="yes")
    with pytest.raises(ValueError, match="local_backward: 'fused' is the backward of local='fused'"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, interpret=True, local_backward="fused")
    with pytest.raises(ValueError, match=r"walk_cotangents: expected one of \['xla', 'fused'\], got 'yes'"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, interpret=True, walk_cotangents="yes")
    with pytest.raises(ValueError, match="walk_cotangents: 'fused' takes bfloat16 or float16 inputs on the GPU"):
        gated_delta_rule_pallas_gpu(*args, None, chunk_size=16, walk_cotangents="fused")  # float32, compiled


def test_stage_defaults_follow_fused_by_default_for_16_bit_inputs(monkeypatch):
    """None takes "fused" for the stages in FUSED_BY_DEFAULT with 16-bit inputs (local_backward only with local
    fused), "xla" otherwise; a value given wins."""
    from m2rnn_jax.ops.gated_delta_rule import pallas_gpu

    unset = dict.fromkeys(pallas_gpu.STAGES)
    assert set(pallas_gpu.resolve_stages(jnp.bfloat16, False, **unset).values()) == {"fused"}  # the tree's default
    monkeypatch.setattr(pallas_gpu, "FUSED_BY_DEFAULT", frozenset())
    assert set(pallas_gpu.resolve_stages(jnp.bfloat16, False, **unset).values()) == {"xla"}
    monkeypatch.setattr(pallas_gpu, "FUSED_BY_DEFAULT", frozenset(pallas_gpu.STAGES))
    assert set(pallas_gpu.resolve_stages(jnp.bfloat16, False, **unset).values()) == {"fused"}
    assert set(pallas_gpu.resolve_stages(jnp.float16, False, **unset).values()) == {"fused"}
    assert set(pallas_gpu.resolve_stages(jnp.float32, False, **unset).values()) == {"xla"}
    explicit = pallas_gpu.resolve_stages(jnp.bfloat16, False, **{**unset, "local": "xla", "outputs": "xla"})
    assert explicit == {"local": "xla", "local_backward": "xla", "outputs": "xla", "walk_cotangents": "fused"}
    monkeypatch.setattr(pallas_gpu, "FUSED_BY_DEFAULT", frozenset({"outputs"}))
    assert pallas_gpu.resolve_stages(jnp.bfloat16, False, **unset)["outputs"] == "fused"
    assert pallas_gpu.resolve_stages(jnp.bfloat16, False, **unset)["local"] == "xla"


def test_fused_by_default_runs_the_fused_stages(monkeypatch):
    """With every stage in FUSED_BY_DEFAULT the backend's default call (bf16, interpret mode) equals the call that
    names all four stages, value and every gradient, bit for bit."""
    from m2rnn_jax.ops.gated_delta_rule import pallas_gpu

    x = random_gdn_inputs(13, 1, 32, 2, 16, 32, dtype=jnp.bfloat16, reset_rate=0.1)
    args = tuple(x[n].astype(jnp.float32) if n in ("beta", "log_alpha", "h0") else x[n] for n in ARGS)

    def run(**stages):
        def loss(*a):
            o, final = pallas_gpu.gated_delta_rule_pallas_gpu(*a, x["reset"], chunk_size=16, interpret=True, **stages)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

        return jax.value_and_grad(loss, argnums=tuple(range(6)))(*args)

    named = run(**dict.fromkeys(pallas_gpu.STAGES, "fused"))
    monkeypatch.setattr(pallas_gpu, "FUSED_BY_DEFAULT", frozenset())
    unnamed_xla = run()
    monkeypatch.setattr(pallas_gpu, "FUSED_BY_DEFAULT", frozenset(pallas_gpu.STAGES))
    unnamed = run()
    for a, b in zip(jax.tree.leaves(unnamed), jax.tree.leaves(named)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert any(  # the tree's default (every stage "xla") rounds differently somewhere
        not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        for a, b in zip(jax.tree.leaves(unnamed_xla), jax.tree.leaves(named))
    )


def test_chunk_product_gradient_rejects_other_equations():
    from m2rnn_jax.ops.gated_delta_rule.chunked import matmul

    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    loss = lambda a, b: jnp.sum(matmul("bij,bjk->bik", a, b, jnp.float32))
    with pytest.raises(ValueError, match="equation: expected the form '...xy,...yz->...xz'"):
        jax.grad(loss)(a, b)
