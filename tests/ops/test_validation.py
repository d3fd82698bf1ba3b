"""Bad input raises ValueError naming the argument, the expected and the actual shape or value."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from m2rnn_jax import m2rnn
from m2rnn_jax.testing import random_m2rnn_inputs


@pytest.fixture(scope="module")
def dense():
    return random_m2rnn_inputs(
        jax.random.key(0), batch=2, seq_len=3, num_heads=4, k_dim=5, v_dim=3, num_q_heads=1, num_k_heads=2
    )


@pytest.fixture(scope="module")
def packed():
    return random_m2rnn_inputs(
        jax.random.key(1), batch=0, seq_len=0, num_heads=2, k_dim=2, v_dim=2, cu_seqlens=[0, 2, 5]
    )


def _raises(inputs, message, **kwargs):
    with pytest.raises(ValueError, match=message):
        m2rnn(**{**inputs, **kwargs})


def test_wrong_rank(dense):
    _raises(dense, re.escape("q: expected rank 4 with shape (B, S, Nq, K), got shape (2, 3, 5)"), q=dense["q"][:, :, 0])
    _raises(
        dense, re.escape("f: expected rank 3 with shape (B, S, Nf), got shape (2, 3, 4, 1)"), f=dense["f"][..., None]
    )
    _raises(dense, re.escape("W: expected rank 3 with shape (Nw, V, V), got shape (3, 3)"), W=dense["W"][0])


def test_mismatched_batch_or_length(dense):
    _raises(
        dense,
        re.escape("k: expected leading dims (B, S) = (2, 3) as in q, got shape (2, 2, 2, 5)"),
        k=dense["k"][:, :2],
    )
    _raises(
        dense, re.escape("v: expected leading dims (B, S) = (2, 3) as in q, got shape (1, 3, 4, 3)"), v=dense["v"][:1]
    )


def test_mismatched_k_and_v(dense):
    _raises(
        dense,
        re.escape("k: expected shape (B, S, Nk, K) with K (as in q) = 5, got shape (2, 3, 2, 4)"),
        k=dense["k"][..., :4],
    )
    _raises(
        dense, re.escape("W: expected shape (Nw, V, V) with V (as in v) = 3, got shape (4, 2, 3)"), W=dense["W"][:, :2]
    )


def test_head_counts_must_divide(dense):
    _raises(
        dense,
        "head counts: each of Nq, Nk, Nv, Nf, Nw must divide N = max\\(...\\) = 4; .*k: 3.*k do not",
        k=jnp.concatenate([dense["k"], dense["k"][:, :, :1]], axis=2),
    )


def test_h0_shape(dense):
    _raises(dense, re.escape("h0: expected shape (B, N, K, V) = (2, 4, 5, 3), got (2, 1, 5, 3)"), h0=dense["h0"][:, :1])


def test_non_float_dtypes(dense):
    _raises(dense, "q: expected a floating-point array, got dtype int32", q=dense["q"].astype(jnp.int32))
    _raises(dense, "f: expected a floating-point array, got dtype int32", f=dense["f"].astype(jnp.int32))
    _raises(
        dense, "q, k, v: expected one dtype, got q bfloat16, k float32, v float32", q=dense["q"].astype(jnp.bfloat16)
    )
    _raises(dense, "state_dtype: expected a floating-point dtype, got int32", state_dtype=jnp.int32)


def test_bad_cu_seqlens(packed):
    _raises(
        packed,
        re.escape(
            "cu_seqlens: expected non-decreasing offsets starting at 0 and ending at the "
            "number of packed tokens T = 5, got [0, 4, 2]"
        ),
        cu_seqlens=jnp.array([0, 4, 2]),
    )
    _raises(packed, "ending at the number of packed tokens T = 5, got \\[0, 2, 6\\]", cu_seqlens=jnp.array([0, 2, 6]))
    _raises(
        packed, re.escape("cu_seqlens: expected shape (B+1,) with B >= 1, got shape (1,)"), cu_seqlens=jnp.array([0])
    )
    _raises(packed, "cu_seqlens: expected an integer array, got dtype float32", cu_seqlens=jnp.array([0.0, 2.0, 5.0]))
    _raises(packed, re.escape("q: expected rank 3 with shape (T, Nq, K), got shape (1, 5, 2, 2)"), q=packed["q"][None])


def test_bad_options(dense):
    _raises(
        dense, "backend: expected one of \\['auto', 'scan', 'pallas_gpu', 'pallas_tpu'\\], got 'cuda'", backend="cuda"
    )
    _raises(dense, "interpret: True needs a Pallas backend", interpret=True, backend="scan")
    _raises(dense, "gradient_clipping: expected None or a finite float, got str '1'", gradient_clipping="1")
    _raises(dense, "gradient_clipping: expected None or a finite float, got inf", gradient_clipping=float("inf"))


def test_contract_in_help():
    doc = m2rnn.__doc__
    for needle in ("q (B, S, Nq, K)", "cu_seqlens (B+1,)", "Gradient clipping", "Backends", "Raises ValueError"):
        assert needle in doc


def test_auto_backend_resolution(monkeypatch):
    from m2rnn_jax.ops.m2rnn import backends

    assert backends.resolve_backend_name("auto") == "scan"  # CPU
    monkeypatch.setattr(backends, "_platform", lambda: "tpu")
    assert backends.resolve_backend_name("auto", jnp.bfloat16) == "pallas_tpu"
    assert backends.resolve_backend_name("auto", jnp.float64) == "scan"  # the kernels compute in float32
    assert backends.resolve_backend_name("scan") == "scan"


def test_auto_backend_on_nvidia_keeps_float32_with_wide_states_on_the_scan(monkeypatch):
    """float32 inputs with V > 16 run the scan on NVIDIA GPUs (measured faster there); bf16 and V = 16 the kernels."""
    from m2rnn_jax.ops.m2rnn import backends

    monkeypatch.setattr(backends, "_platform", lambda: "gpu_nvidia")
    assert backends.resolve_backend_name("auto", jnp.float32, v_dim=64) == "scan"
    assert backends.resolve_backend_name("auto", jnp.float32, v_dim=16) == "pallas_gpu"
    assert backends.resolve_backend_name("auto", jnp.bfloat16, v_dim=64) == "pallas_gpu"
    assert backends.resolve_backend_name("auto", jnp.float32) == "pallas_gpu"  # V unknown
    assert backends.resolve_backend_name("pallas_gpu", jnp.float32, v_dim=64) == "pallas_gpu"  # explicit wins
    monkeypatch.setattr(backends, "_platform", lambda: "tpu")
    assert backends.resolve_backend_name("auto", jnp.float32, v_dim=64) == "pallas_tpu"


def test_backends_get_the_validated_shapes(dense, packed, monkeypatch):
    """The op hands each backend the M2RNNShapes of validate_inputs (nothing recomputes them)."""
    from m2rnn_jax.ops.m2rnn import backends
    from m2rnn_jax.ops.m2rnn.validation import validate_inputs

    seen = []
    scan = backends.get_backend("scan")

    def spy(*args, shapes, **kwargs):
        seen.append(shapes)
        return scan(*args, shapes=shapes, **kwargs)

    monkeypatch.setitem(backends._REGISTRY, "scan", spy)
    names = ("q", "k", "v", "W", "f", "h0")
    for inputs, cu in ((dense, None), (packed, packed["cu_seqlens"])):
        m2rnn(*(inputs[n] for n in names), cu_seqlens=cu, backend="scan")
        assert seen.pop() == validate_inputs(*(inputs[n] for n in names), cu)
    assert seen == []


@pytest.mark.parametrize("backend", ["scan", "pallas_gpu", "pallas_tpu"])
def test_direct_backend_call_validates(dense, backend):
    """A backend called directly (shapes None, as benchmarks do) validates its inputs like the op."""
    from m2rnn_jax.ops.m2rnn.backends import get_backend

    args = [dense[n] for n in ("q", "k", "v", "W", "f", "h0")]
    args[2] = args[2][:, :, :3]  # Nv = 3 does not divide N = 4
    call = get_backend(backend)
    options = dict(cu_seqlens=None, gradient_clipping=None, state_dtype=jnp.float32, interpret=backend != "scan")
    with pytest.raises(ValueError, match="head counts: each of Nq, Nk, Nv, Nf, Nw must divide N"):
        call(*args, **options)
