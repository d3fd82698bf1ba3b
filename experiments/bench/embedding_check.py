"""The token embedding's lookup on the GPU: variants of the (V, h) float32 table -> (B, S, h) bf16 rows, forward and
forward+backward (the table's gradient), timed side by side, with outputs and gradients compared to the first.

    python3 experiments/bench/embedding_check.py [--batch 8 --seq-len 4096 --vocab 100352 --hidden 1024]

Variants: ``cast_table_then_take`` (what ``nnx.Embed`` does: the whole table cast to the compute dtype, then the
gather; its gradient is a scatter-add in the compute dtype), ``take_then_cast`` (gather float32 rows, cast them;
float32 scatter-add), ``take_then_cast_clip`` (the same with ``mode="clip"``: no out-of-range mask).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from m2rnn_jax.bench.timing import median_ms
from m2rnn_jax.testing import relative_error

VARIANTS = {
    "cast_table_then_take": lambda table, ids: jnp.take(table.astype(jnp.bfloat16), ids, axis=0),
    "take_then_cast": lambda table, ids: jnp.take(table, ids, axis=0).astype(jnp.bfloat16),
    "take_then_cast_clip": lambda table, ids: jnp.take(table, ids, axis=0, mode="clip").astype(jnp.bfloat16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 3)
    table = 0.02 * jax.random.normal(keys[0], (args.vocab, args.hidden), jnp.float32)
    ids = jax.random.randint(keys[1], (args.batch, args.seq_len), 0, args.vocab)
    cotangent = jax.random.normal(keys[2], (args.batch, args.seq_len, args.hidden), jnp.bfloat16)
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; B={args.batch} S={args.seq_len} "
        f"V={args.vocab} h={args.hidden}, float32 table -> bfloat16 rows"
    )
    reference = None
    for name, lookup in VARIANTS.items():
        forward = jax.jit(lookup)
        gradient = jax.jit(lambda t, i, lookup=lookup: jax.vjp(lambda t: lookup(t, i), t)[1](cotangent)[0])
        outputs = (forward(table, ids), gradient(table, ids))
        if reference is None:
            reference = outputs
        error = max(relative_error(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(outputs, reference))
        forward_ms = median_ms(forward, table, ids)
        backward_ms = median_ms(gradient, table, ids)
        print(
            f"{name:22s} forward {forward_ms:8.3f} ms   gradient (incl. forward) {backward_ms:8.3f} ms   "
            f"max rel. error vs first {error:.1e}"
        )


if __name__ == "__main__":
    main()
