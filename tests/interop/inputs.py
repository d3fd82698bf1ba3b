"""Realistic random M2RNN op inputs drawn with NumPy (no JAX compilation: keeps this test group fast).

Same distributions as ``m2rnn_jax.testing.random_m2rnn_inputs``: f from the softplus decay gate at init, W near
the identity, unit-scale q and v, k scaled by 1/sqrt(K), h0 a reachable state in (-1, 1).
"""

from __future__ import annotations

import math

import numpy as np


def numpy_m2rnn_inputs(
    seed: int,
    *,
    batch: int,
    seq_len: int,
    counts: tuple[int, int, int, int, int],
    k_dim: int,
    v_dim: int,
    with_h0: bool = True,
) -> dict[str, np.ndarray]:
    """Float64 q (B, S, Nq, K), k (B, S, Nk, K), v (B, S, Nv, V), f (B, S, Nf), W (Nw, V, V), h0 (B, N, K, V).

    counts = (Nq, Nk, Nv, Nf, Nw); N = max(counts).
    """
    rng = np.random.default_rng(seed)
    nq, nk, nv, nf, nw = counts
    a_log = np.log(rng.uniform(0.5, 16.0, size=nf))
    dt_bias = np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), size=nf))))
    gate_in = rng.normal(0.0, 1.0, size=(batch, seq_len, nf))
    inputs = dict(
        q=rng.normal(0.0, 1.0, size=(batch, seq_len, nq, k_dim)),
        k=rng.normal(0.0, 1.0, size=(batch, seq_len, nk, k_dim)) / math.sqrt(k_dim),
        v=rng.normal(0.0, 1.0, size=(batch, seq_len, nv, v_dim)),
        W=np.eye(v_dim)[None] + rng.normal(0.0, 0.3 / math.sqrt(v_dim), size=(nw, v_dim, v_dim)),
        f=np.exp(-np.exp(a_log) * np.logaddexp(0.0, gate_in + dt_bias)),
    )
    if with_h0:
        inputs["h0"] = np.tanh(rng.normal(0.0, 0.5, size=(batch, max(counts), k_dim, v_dim)))
    return inputs


def numpy_varlen_inputs(
    seed: int, *, cu_seqlens: list[int], counts: tuple[int, int, int, int, int], k_dim: int, v_dim: int
) -> dict[str, np.ndarray]:
    """Packed float64 q (T, Nq, K), k, v, f (T, Nf), W, h0 (B, N, K, V) and cu_seqlens (B+1,) int32."""
    dense = numpy_m2rnn_inputs(seed, batch=1, seq_len=cu_seqlens[-1], counts=counts, k_dim=k_dim, v_dim=v_dim)
    packed = {name: dense[name][0] for name in ("q", "k", "v", "f")}
    batch = len(cu_seqlens) - 1
    h0 = np.tanh(np.random.default_rng(seed + 1).normal(0.0, 0.5, size=(batch, max(counts), k_dim, v_dim)))
    return dict(packed, W=dense["W"], h0=h0, cu_seqlens=np.asarray(cu_seqlens, dtype=np.int32))
