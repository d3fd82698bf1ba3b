"""Benchmark of the LM head + cross-entropy: the chunked version against the plain one (full logits).

    python -m m2rnn_jax.bench.loss                                   # B=8, S=4096, h=1024, V=100352, bf16
    python -m m2rnn_jax.bench.loss --chunk-sizes 1024 2048 4096 --json head.json
    python -m m2rnn_jax.bench.loss --batch 2 --seq-len 64 --hidden 32 --vocab 512 --dtype float32   # CPU

Both versions take hidden states (B*S, h) in the compute dtype and a float32 kernel (h, V) and return (mean token
cross-entropy, number of correct argmax predictions), what the train step needs. "plain" is the code the train step
ran before the chunked head: logits (B*S, V) in the compute dtype (``nnx.Linear``), ``log_softmax`` in float32
(:func:`m2rnn_jax.models.loss.cross_entropy`) and an argmax. "chunked" is
:func:`m2rnn_jax.models.lm_head_loss.lm_head_cross_entropy`. Forward+backward is one jitted ``value_and_grad``
wrt hidden and kernel. Times: median ms per call (:func:`m2rnn_jax.bench.timing.median_ms`); memory: the compiled
executable's temporaries (``memory_analysis().temp_size_in_bytes``). The ``*_rel_diff`` entries compare the chunked
loss and gradients with the plain ones at this shape (relative L2 norm of the difference).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from m2rnn_jax.bench.report import format_table, write_json
from m2rnn_jax.bench.timing import compile_timed, median_ms, temp_bytes, to_gib
from m2rnn_jax.models.lm_head_loss import default_num_chunks, lm_head_cross_entropy
from m2rnn_jax.models.loss import cross_entropy

SEED = 0
INIT_STD = 0.02  # the kernel's init (initializer_range)


def head_inputs(num_tokens: int, hidden: int, vocab: int, dtype: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden (N, h) ~N(0, 1) in ``dtype`` (what the final RMSNorm gives), kernel (h, V) float32 ~N(0, 0.02^2),
    uniform random targets (N,) int32."""
    keys = jax.random.split(jax.random.PRNGKey(SEED), 3)
    x = jax.random.normal(keys[0], (num_tokens, hidden), jnp.float32).astype(dtype)
    kernel = INIT_STD * jax.random.normal(keys[1], (hidden, vocab), jnp.float32)
    targets = jax.random.randint(keys[2], (num_tokens,), 0, vocab, dtype=jnp.int32)
    return x, kernel, targets


def plain_loss(x: jax.Array, kernel: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full logits in the compute dtype (x.dtype), float32 log_softmax: (mean cross-entropy, correct count)."""
    logits = jnp.dot(x, kernel.astype(x.dtype))
    mean, _ = cross_entropy(logits[None], targets[None])
    return mean, jnp.sum(jnp.argmax(logits, axis=-1) == targets)


def chunked_loss(chunk_size: int | None) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """:func:`lm_head_cross_entropy` with ``chunk_size``: (mean cross-entropy, correct count)."""

    def loss(x: jax.Array, kernel: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        head = lm_head_cross_entropy(x, kernel, targets, chunk_size=chunk_size, compute_dtype=x.dtype)
        return head.nll_sum / jnp.maximum(head.weight_sum, 1.0), jnp.sum(head.correct)

    return loss


def _time(loss: Callable, args: tuple, iters: int, repeats: int) -> tuple[dict[str, Any], Any]:
    """Forward and forward+backward ms, temporaries and compile seconds of ``loss``; also (loss, grads)."""
    forward = compile_timed(jax.jit(loss), *args)
    fwd_bwd = compile_timed(jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), *args)
    row = {
        "forward_ms": median_ms(forward.executable, *args, iters=iters, repeats=repeats),
        "fwd_bwd_ms": median_ms(fwd_bwd.executable, *args, iters=iters, repeats=repeats),
        "forward_temp_gib": to_gib(temp_bytes(forward.executable)),
        "fwd_bwd_temp_gib": to_gib(temp_bytes(fwd_bwd.executable)),
        "compile_s": forward.compile_s + fwd_bwd.compile_s,
    }
    (value, _), grads = fwd_bwd.executable(*args)
    return row, (value, grads)


def _relative_difference(actual: jax.Array, expected: jax.Array) -> float:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    return float(jnp.linalg.norm(actual - expected) / jnp.maximum(jnp.linalg.norm(expected), 1e-30))


def bench_lm_head_loss(
    batch: int,
    seq_len: int,
    hidden: int,
    vocab: int,
    dtype: str,
    iters: int,
    repeats: int,
    *,
    chunk_size: int | None = None,
    compare_plain: bool = True,
) -> dict[str, Any]:
    """Times the chunked LM head + loss at N = batch * seq_len tokens (and the plain version beside it).

    Returns:
        ``forward_ms``, ``fwd_bwd_ms``, ``forward_temp_gib``, ``fwd_bwd_temp_gib``, ``compile_s``,
        ``chunk_tokens`` (tokens per chunk) of the chunked version; with ``compare_plain`` the
        first five again with a ``plain_`` prefix, and ``loss_rel_diff``, ``d_hidden_rel_diff``,
        ``d_kernel_rel_diff`` (chunked vs plain).
    """
    num_tokens = batch * seq_len
    args = head_inputs(num_tokens, hidden, vocab, dtype)
    num_chunks = default_num_chunks(num_tokens, vocab) if chunk_size is None else -(-num_tokens // chunk_size)
    result, (value, grads) = _time(chunked_loss(chunk_size), args, iters, repeats)
    result["chunk_tokens"] = -(-num_tokens // num_chunks)
    if compare_plain:
        plain, (plain_value, plain_grads) = _time(plain_loss, args, iters, repeats)
        result.update({f"plain_{key}": value_ for key, value_ in plain.items()})
        result["loss_rel_diff"] = _relative_difference(value, plain_value)
        result["d_hidden_rel_diff"] = _relative_difference(grads[0], plain_grads[0])
        result["d_kernel_rel_diff"] = _relative_difference(grads[1], plain_grads[1])
    return result


TABLE_COLUMNS = [
    ("chunk", "chunk_tokens", "{}"),
    ("fwd ms", "forward_ms", "{:.2f}"),
    ("fwd+bwd ms", "fwd_bwd_ms", "{:.2f}"),
    ("fwd+bwd temp GiB", "fwd_bwd_temp_gib", "{:.2f}"),
    ("plain fwd ms", "plain_forward_ms", "{:.2f}"),
    ("plain fwd+bwd ms", "plain_fwd_bwd_ms", "{:.2f}"),
    ("plain fwd+bwd temp GiB", "plain_fwd_bwd_temp_gib", "{:.2f}"),
    ("loss diff", "loss_rel_diff", "{:.1e}"),
    ("dh diff", "d_hidden_rel_diff", "{:.1e}"),
    ("dW diff", "d_kernel_rel_diff", "{:.1e}"),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2rnn_jax.bench.loss", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="*",
        default=[],
        help="tokens per chunk, one row each (default: one row with the default chunking)",
    )
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for chunk_size in args.chunk_sizes or [None]:
        rows.append(
            bench_lm_head_loss(
                args.batch,
                args.seq_len,
                args.hidden,
                args.vocab,
                args.dtype,
                args.iters,
                args.repeats,
                chunk_size=chunk_size,
                compare_plain=not rows,
            )
        )
    print(
        f"LM head + loss on {jax.devices()[0].device_kind} (jax {jax.__version__}): N={args.batch}x{args.seq_len} "
        f"h={args.hidden} V={args.vocab} {args.dtype}"
    )
    print(format_table(TABLE_COLUMNS, rows))
    if args.json:
        write_json(args.json, {"shape": vars(args), "jax": jax.__version__, "rows": rows})
    else:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
