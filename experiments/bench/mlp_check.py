"""GPU check of the SwiGLU MLP's up-projection: the interleaved kernel's gate and up columns as two matmuls
("columns", the layer since session 12) against one matmul of the kernel with its columns reordered to
[gate | up] ("halves", whose backward writes both halves' gradients in one fusion) and one matmul of the kernel as
it is, interleaved ("interleaved": SwiGLU reads the (tokens, 2I) product's even and odd columns, and its
hand-written backward writes d gate and d up back interleaved from one elementwise pass over (tokens, I, 2), so that
the backward reads dh, gate and up once where autodiff of "columns" runs two passes, one per gradient: 7.4 ms of
the 1L hybrid's H200 step in session 12's profile), forward and forward+backward (gradients of x and both kernels),
medians after warm-up (``m2rnn_jax.bench.timing.median_ms``), in one run; the relative differences of every result
against "columns".

    PYTHONPATH=. python3 experiments/bench/mlp_check.py [--batch 8 --seq-len 4096 --hidden 1024 --intermediate 2752]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from m2rnn_jax.bench.timing import median_ms
from m2rnn_jax.layers.mlp import GATE_COLUMNS, UP_COLUMNS, swiglu
from m2rnn_jax.testing import relative_error

DTYPE = jnp.bfloat16


def columns(x: jax.Array, fc: jax.Array, proj: jax.Array) -> jax.Array:
    gate, up = (jnp.dot(x, fc[:, c].astype(DTYPE)) for c in (GATE_COLUMNS, UP_COLUMNS))
    return jnp.dot(swiglu(gate, up), proj.astype(DTYPE))


def halves(x: jax.Array, fc: jax.Array, proj: jax.Array) -> jax.Array:
    reordered = jnp.concatenate([fc[:, GATE_COLUMNS], fc[:, UP_COLUMNS]], axis=1).astype(DTYPE)
    gate, up = jnp.split(jnp.dot(x, reordered), 2, axis=-1)
    return jnp.dot(swiglu(gate, up), proj.astype(DTYPE))


@jax.custom_vjp
def swiglu_interleaved(gate_up: jax.Array) -> jax.Array:
    """gate_up (..., 2I) with gate in the even and up in the odd columns -> (..., I) ``up * silu(gate)``."""
    return swiglu(gate_up[..., 0::2], gate_up[..., 1::2])


def _swiglu_interleaved_fwd(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
    return swiglu_interleaved(gate_up), gate_up


def _swiglu_interleaved_bwd(gate_up: jax.Array, dh: jax.Array) -> tuple[jax.Array]:
    compute = jnp.promote_types(jnp.float32, gate_up.dtype)
    pairs = gate_up.reshape(*gate_up.shape[:-1], -1, 2).astype(compute)  # (..., I, 2): [gate, up]
    gate, up = pairs[..., 0], pairs[..., 1]
    sigmoid = jax.nn.sigmoid(gate)
    dh = dh.astype(compute)
    dgate = dh * up * sigmoid * (1 + gate * (1 - sigmoid))
    dup = dh * gate * sigmoid
    return (jnp.stack([dgate, dup], axis=-1).reshape(gate_up.shape).astype(gate_up.dtype),)


swiglu_interleaved.defvjp(_swiglu_interleaved_fwd, _swiglu_interleaved_bwd)


def interleaved(x: jax.Array, fc: jax.Array, proj: jax.Array) -> jax.Array:
    return jnp.dot(swiglu_interleaved(jnp.dot(x, fc.astype(DTYPE))), proj.astype(DTYPE))


VARIANTS = {"columns": columns, "halves": halves, "interleaved": interleaved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (args.batch * args.seq_len, args.hidden), DTYPE)
    fc = 0.02 * jax.random.normal(keys[1], (args.hidden, 2 * args.intermediate), jnp.float32)
    proj = 0.02 * jax.random.normal(keys[2], (args.intermediate, args.hidden), jnp.float32)
    dy = jax.random.normal(keys[3], (x.shape[0], args.hidden), DTYPE)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; x {x.shape} bf16, I={args.intermediate}")
    results, outputs = {}, {}
    for name, fn in VARIANTS.items():
        forward = jax.jit(fn)
        both = jax.jit(lambda x, fc, proj, fn=fn: jax.vjp(fn, x, fc, proj)[1](dy))
        outputs[name] = (forward(x, fc, proj), *both(x, fc, proj))
        results[name] = {"fwd_ms": median_ms(forward, x, fc, proj), "fwd_bwd_ms": median_ms(both, x, fc, proj)}
        print(
            f"{name:8s} forward {results[name]['fwd_ms']:.3f} ms, forward+backward {results[name]['fwd_bwd_ms']:.3f} ms"
        )
    for name in VARIANTS:
        if name != "columns":
            for part, a, b in zip(("y", "dx", "dfc", "dproj"), outputs[name], outputs["columns"]):
                results.setdefault(f"{name}_vs_columns", {})[part] = relative_error(a, b)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
