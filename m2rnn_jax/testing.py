"""Random, realistic inputs for the M2RNN op, shared by tests and benchmarks.

Realistic means what the trained layer feeds the op: forget values from the softplus decay gate at init
(f = exp(-A * softplus(x + dt_bias)), A ~ U(0, 16), dt_bias from dt ~ logU(1e-3, 0.1); f roughly in [0.2, 1]),
a state weight near the identity, and q, k, v of unit scale (post conv + SiLU). Never zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def decay_gate_forget_values(key: jax.Array, shape: tuple[int, ...], num_heads_axis_size: int) -> jax.Array:
    """Forget values f (..., Nf) in (0, 1] from the softplus decay gate with SPEC §2.3 init, in float32.

    ``shape`` is the full shape of f, whose last axis has ``num_heads_axis_size`` heads.
    """
    key_a, key_dt, key_x = jax.random.split(key, 3)
    a = jax.random.uniform(key_a, (num_heads_axis_size,), jnp.float32, 0.0, 16.0)
    log_dt = jax.random.uniform(key_dt, (num_heads_axis_size,), jnp.float32, np.log(1e-3), np.log(0.1))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    x = 0.5 * jax.random.normal(key_x, shape, jnp.float32)
    return jnp.exp(-a * jax.nn.softplus(x + dt_bias))


def random_m2rnn_inputs(
    key: jax.Array,
    *,
    batch: int,
    seq_len: int,
    num_heads: int,
    k_dim: int,
    v_dim: int,
    num_q_heads: int | None = None,
    num_k_heads: int | None = None,
    num_v_heads: int | None = None,
    num_f_heads: int | None = None,
    num_w_heads: int | None = None,
    dtype: jnp.dtype = jnp.float32,
    with_h0: bool = True,
    cu_seqlens: list[int] | np.ndarray | None = None,
) -> dict[str, jax.Array]:
    """Return a dict with q, k, v, W, f, h0 (and cu_seqlens) for one op call.

    Dense: q (batch, seq_len, Nq, K) etc. Varlen (``cu_seqlens`` given): packed (T, ...) inputs with
    T = cu_seqlens[-1] and ``batch`` ignored in favour of len(cu_seqlens) - 1. Head counts default to
    ``num_heads``. q, k, v, f, W and h0 have ``dtype``; h0 entries lie in [-1, 1] like a reachable state.
    """
    counts = {
        "q": num_q_heads or num_heads,
        "k": num_k_heads or num_heads,
        "v": num_v_heads or num_heads,
        "f": num_f_heads or num_heads,
        "w": num_w_heads or num_heads,
    }
    if cu_seqlens is not None:
        offsets = np.asarray(cu_seqlens, dtype=np.int32)
        batch, lead = len(offsets) - 1, (int(offsets[-1]),)
    else:
        lead = (batch, seq_len)
    keys = jax.random.split(key, 6)
    inputs = {
        "q": jax.random.normal(keys[0], lead + (counts["q"], k_dim), jnp.float32),
        "k": jax.random.normal(keys[1], lead + (counts["k"], k_dim), jnp.float32),
        "v": jax.random.normal(keys[2], lead + (counts["v"], v_dim), jnp.float32),
        "f": decay_gate_forget_values(keys[3], lead + (counts["f"],), counts["f"]),
        "W": jnp.eye(v_dim, dtype=jnp.float32)
        + 0.3 / np.sqrt(v_dim) * jax.random.normal(keys[4], (counts["w"], v_dim, v_dim), jnp.float32),
    }
    if with_h0:
        inputs["h0"] = jnp.tanh(jax.random.normal(keys[5], (batch, num_heads, k_dim, v_dim), jnp.float32))
    inputs = {name: x.astype(dtype) for name, x in inputs.items()}
    if cu_seqlens is not None:
        inputs["cu_seqlens"] = jnp.asarray(offsets)
    return inputs
