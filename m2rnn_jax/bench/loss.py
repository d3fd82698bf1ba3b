"""Benchmark of the LM head + cross-entropy: the chunked version against the plain one (full logits).

    python -m m2rnn_jax.bench.loss                                   # B=8, S=4096, h=1024, V=100352, bf16
    python -m m2rnn_jax.bench.loss --chunk-sizes 1024 2048 4096 --statistics two_pass pallas_gpu --json head.json
    python -m m2rnn_jax.bench.loss --batch 2 --seq-len 64 --hidden 32 --vocab 512 --dtype float32   # CPU
    python -m m2rnn_jax.bench.loss --kernel-configs 8x2048x8x2 16x1024x8x2 --kernel-rows 2048       # GPU kernel sweep
    python -m m2rnn_jax.bench.loss --tile-configs 128x128x64x8x3 128x256x64x8x3 --kernel-rows 2048   # fused GEMM

Both versions take hidden states (B*S, h) in the compute dtype and a float32 kernel (h, V) and return (mean token
cross-entropy, number of correct argmax predictions), what the train step needs. "plain" is the code the train step
ran before the chunked head: logits (B*S, V) in the compute dtype (``nnx.Linear``), ``log_softmax`` in float32
(:func:`m2rnn_jax.models.loss.cross_entropy`) and an argmax. "chunked" is
:func:`m2rnn_jax.models.lm_head_loss.lm_head_cross_entropy`. Forward+backward is one jitted ``value_and_grad``
wrt hidden and kernel. Times: median ms per call (:func:`m2rnn_jax.bench.timing.median_ms`); memory: the compiled
executable's temporaries (``memory_analysis().temp_size_in_bytes``). The ``*_rel_diff`` entries compare the chunked
loss and gradients with the plain ones at this shape (relative L2 norm of the difference). ``--statistics`` picks
how each chunk's softmax statistics and logits gradient are computed (one row per chunk size and choice; see
:data:`m2rnn_jax.models.lm_head_loss.STATISTICS`).

``--kernel-configs`` instead times only what follows the logits GEMM of one chunk: logits (R, V) ~N(0, 4) in the
first of ``--logits-dtypes`` -> (nll, hits) alone ("stats") and with d logits in the compute dtype ("grad"), for
"two_pass" (jnp) and the fused kernel :mod:`pallas_kernels.gpu.softmax_xent` at each launch configuration
``ROWSxCOLSxWARPSxSTAGES``, and with ``--one-read-configs`` its one-read kernel ("one_read": the gradient only,
given each row's target logit; timed as the kernel writes D, scaled back to d logits for the comparison); the
``*_max_diff`` entries compare each with two_pass (max |difference| of nll and d logits). The one-read kernel writes
D over the logits: the benchmark does not donate them, so its time includes XLA's copy of the logits, timed alone
(a negation, the same bytes) in the last row, "logits_copy".

``--tile-configs`` times one chunk's logits GEMM (rows x h x V in the compute dtype): XLA's GEMM writing float32
logits ("xla_gemm", the first step of "two_pass" / "pallas_gpu"), then the GEMM with the statistics in its epilogue
(:mod:`pallas_kernels.gpu.logits_softmax_tiles`, what "fused_matmul" runs) at each ``ROWSxCOLSxDEPTHxWARPSxSTAGES``,
with exp(logits - target logit) written ("with_exp_ms", the gradient's forward) and without ("stats_ms");
``tflops`` is the GEMM's rate in the with-exp time and ``lse_max_diff`` the logsumexp against XLA's logits.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from m2rnn_jax.bench.report import format_table, write_json
from m2rnn_jax.bench.timing import compile_timed, median_ms, temp_bytes, to_gib
from m2rnn_jax.models.lm_head_loss import STATISTICS, chunk_loss_terms, default_num_chunks, lm_head_cross_entropy
from m2rnn_jax.models.loss import cross_entropy
from pallas_kernels.gpu.logits_softmax_tiles import LogitsTilesConfig, combine_tiles, logits_softmax_tiles
from pallas_kernels.gpu.softmax_xent import SoftmaxXentConfig, softmax_cross_entropy

SEED = 0
INIT_STD = 0.02  # the kernel's init (initializer_range)
PROFILE_CALLS = 3  # traced forward+backward calls per row with --profile
PROFILE_ROWS = 25  # rows per table of a profile


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


def chunked_loss(
    chunk_size: int | None,
    statistics: str = "two_pass",
    interpret: bool = False,
    tiles_config: LogitsTilesConfig | None = None,
    logits_dtype: str | None = None,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """:func:`lm_head_cross_entropy` with ``chunk_size``, ``statistics``, ``interpret``, ``tiles_config`` and
    ``logits_dtype``: (mean cross-entropy, correct count)."""

    def loss(x: jax.Array, kernel: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        head = lm_head_cross_entropy(
            x,
            kernel,
            targets,
            chunk_size=chunk_size,
            compute_dtype=x.dtype,
            statistics=statistics,
            logits_dtype=logits_dtype,
            interpret=interpret,
            tiles_config=tiles_config,
        )
        return head.nll_sum / jnp.maximum(head.weight_sum, 1.0), jnp.sum(head.correct)

    return loss


def _time(loss: Callable, args: tuple, iters: int, repeats: int) -> tuple[dict[str, Any], Any, Any]:
    """Forward and forward+backward ms, temporaries and compile seconds of ``loss``; also (loss, grads) and the
    compiled forward+backward."""
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
    return row, (value, grads), fwd_bwd.executable


def _relative_difference(actual: jax.Array, expected: jax.Array) -> float:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    return float(jnp.linalg.norm(actual - expected) / jnp.maximum(jnp.linalg.norm(expected), 1e-30))


@functools.lru_cache(maxsize=1)
def _plain_timed(
    batch: int, seq_len: int, hidden: int, vocab: int, dtype: str, iters: int, repeats: int
) -> tuple[dict[str, Any], Any, Any]:
    """:func:`_time` of the plain head at one shape, computed once per process (every row compares with it)."""
    return _time(plain_loss, head_inputs(batch * seq_len, hidden, vocab, dtype), iters, repeats)


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
    statistics: str = "two_pass",
    compare_plain: bool = True,
    interpret: bool = False,
    tiles_config: LogitsTilesConfig | None = None,
    profile_dir: str | None = None,
    logits_dtype: str | None = None,
) -> dict[str, Any]:
    """Times the chunked LM head + loss at N = batch * seq_len tokens (and the plain version beside it);
    ``interpret`` runs the kernels in interpret mode (CPU smoke tests); ``tiles_config`` sets the "fused_matmul"
    kernel's launch parameters; ``logits_dtype``: the dtype the logits GEMM writes (None: float32);
    ``profile_dir``: also trace :data:`PROFILE_CALLS` forward+backward calls there and add their device time per
    source line / file / kernel as ``profile`` (:func:`m2rnn_jax.bench.step_profile.profile_calls`).

    Returns:
        ``forward_ms``, ``fwd_bwd_ms``, ``forward_temp_gib``, ``fwd_bwd_temp_gib``, ``compile_s``,
        ``chunk_tokens`` (tokens per chunk), ``statistics`` and ``logits_dtype`` of the chunked version; with
        ``compare_plain`` the first five again with a ``plain_`` prefix, and ``loss_rel_diff``,
        ``d_hidden_rel_diff``, ``d_kernel_rel_diff`` (chunked vs plain).
    """
    num_tokens = batch * seq_len
    args = head_inputs(num_tokens, hidden, vocab, dtype)
    if chunk_size is None:
        num_chunks = default_num_chunks(num_tokens, vocab, statistics, dtype, logits_dtype)
    else:
        num_chunks = -(-num_tokens // chunk_size)
    loss = chunked_loss(chunk_size, statistics, interpret, tiles_config, logits_dtype)
    result, (value, grads), fwd_bwd = _time(loss, args, iters, repeats)
    result["chunk_tokens"] = -(-num_tokens // num_chunks)
    result["statistics"] = statistics
    result["logits_dtype"] = "float32" if logits_dtype is None else jnp.dtype(logits_dtype).name
    if profile_dir is not None:
        from m2rnn_jax.bench.step_profile import profile_calls  # imports bench.model, which imports this module

        name = f"loss_{result['chunk_tokens']}_{statistics}_{result['logits_dtype']}"
        log_dir = os.path.join(profile_dir, name)
        result["profile"] = profile_calls(lambda: fwd_bwd(*args), fwd_bwd, name, PROFILE_CALLS, log_dir, PROFILE_ROWS)
    if compare_plain:
        plain, (plain_value, plain_grads), _ = _plain_timed(batch, seq_len, hidden, vocab, dtype, iters, repeats)
        result.update({f"plain_{key}": value_ for key, value_ in plain.items()})
        result["loss_rel_diff"] = _relative_difference(value, plain_value)
        result["d_hidden_rel_diff"] = _relative_difference(grads[0], plain_grads[0])
        result["d_kernel_rel_diff"] = _relative_difference(grads[1], plain_grads[1])
    return result


def parse_kernel_config(text: str) -> SoftmaxXentConfig:
    """``"ROWSxCOLSxWARPSxSTAGES"`` (e.g. ``8x2048x8x2``) -> :class:`SoftmaxXentConfig`."""
    parts = text.split("x")
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise ValueError(f"kernel config: expected ROWSxCOLSxWARPSxSTAGES such as 8x2048x8x2, got {text!r}")
    block_rows, block_v, num_warps, num_stages = map(int, parts)
    return SoftmaxXentConfig(block_rows=block_rows, block_v=block_v, num_warps=num_warps, num_stages=num_stages)


def _chunk_terms_function(
    config: SoftmaxXentConfig | None,
    dtype: str,
    with_gradient: bool,
    interpret: bool,
    one_read: bool = False,
    scale_back: bool = True,
) -> Callable[..., Any]:
    """(logits, targets, weights) -> (nll, hits, d logits or None): two_pass for ``config`` None, else the kernel
    (``one_read``: the one-read kernel, its reference the target logit, D scaled back to d logits unless
    ``scale_back`` is False: then D as the kernel writes it, what the timing measures)."""

    def terms(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> Any:
        if config is None:
            return chunk_loss_terms(
                logits, targets, weights, statistics="two_pass", d_dtype=dtype, with_gradient=with_gradient
            )
        reference = None
        if one_read:
            reference = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0].astype(jnp.float32)
        fused = softmax_cross_entropy(
            logits,
            targets,
            weights,
            d_dtype=dtype,
            with_gradient=with_gradient,
            reference=reference,
            config=config,
            interpret=interpret,
        )
        if not (one_read and with_gradient):
            return fused.nll, fused.argmax == targets, fused.d_logits
        if not scale_back:
            return fused.nll, fused.argmax == targets, fused.unscaled_d_logits
        scale = weights * jnp.exp(reference - fused.logsumexp)
        return fused.nll, fused.argmax == targets, scale[:, None] * fused.unscaled_d_logits.astype(jnp.float32)

    return jax.jit(terms)


def bench_chunk_terms(
    rows: int,
    vocab: int,
    dtype: str,
    iters: int,
    repeats: int,
    configs: Sequence[SoftmaxXentConfig],
    interpret: bool = False,
    one_read_configs: Sequence[SoftmaxXentConfig] = (),
    logits_dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Times the statistics ("stats_ms", no gradient) and statistics + d logits ("grad_ms") of one chunk's logits
    (rows, vocab) in ``logits_dtype``: a "two_pass" row, one "pallas_gpu" row per launch configuration, then one
    "one_read" row per configuration of the one-read kernel (``grad_ms`` only), with ``nll_max_diff`` /
    ``d_max_diff`` against two_pass and ``hits_equal`` (``interpret``: the kernels in interpret mode)."""
    keys = jax.random.split(jax.random.PRNGKey(SEED), 3)
    logits = (2.0 * jax.random.normal(keys[0], (rows, vocab), jnp.float32)).astype(logits_dtype)
    targets = jax.random.randint(keys[1], (rows,), 0, vocab, dtype=jnp.int32)
    weights = (jax.random.uniform(keys[2], (rows,)) > 0.1).astype(jnp.float32)
    args = (logits, targets, weights)
    results, reference = [], None
    runs = [(None, False), *((config, False) for config in configs), *((c, True) for c in one_read_configs)]
    for config, one_read in runs:
        stats, grad = (_chunk_terms_function(config, dtype, flag, interpret, one_read) for flag in (False, True))
        # one_read is timed as the kernel writes D; the others as checked
        timed = _chunk_terms_function(config, dtype, True, interpret, one_read, scale_back=False) if one_read else grad
        row = {
            "variant": "two_pass" if config is None else "one_read" if one_read else "pallas_gpu",
            "config": None
            if config is None
            else f"{config.block_rows}x{config.block_v}x{config.num_warps}x{config.num_stages}",
            "stats_ms": None if one_read else median_ms(stats, *args, iters=iters, repeats=repeats),
            "grad_ms": median_ms(timed, *args, iters=iters, repeats=repeats),
        }
        nll, hits, d_logits = grad(*args)
        if reference is None:
            reference = (nll, hits, d_logits)
        row["nll_max_diff"] = float(jnp.max(jnp.abs(nll - reference[0])))
        row["hits_equal"] = bool(jnp.all(hits == reference[1]))
        row["d_max_diff"] = float(jnp.max(jnp.abs(d_logits.astype(jnp.float32) - reference[2].astype(jnp.float32))))
        results.append(row)
    if one_read_configs:  # the copy XLA makes of the logits before a kernel writing over them (not donated here)
        copy = jax.jit(jnp.negative)
        copy_ms = median_ms(copy, logits, iters=iters, repeats=repeats)
        results.append({"variant": "logits_copy", "config": None, "stats_ms": None, "grad_ms": copy_ms})
    return results


def bench_logits_tiles(
    rows: int,
    hidden: int,
    vocab: int,
    dtype: str,
    iters: int,
    repeats: int,
    configs: Sequence[LogitsTilesConfig],
    interpret: bool = False,
) -> list[dict[str, Any]]:
    """Times one chunk's logits GEMM: an "xla_gemm" row (float32 logits, then their logsumexp for the reference),
    then one "fused_matmul" row per launch configuration (see the module docstring)."""
    x, kernel, targets = head_inputs(rows, hidden, vocab, dtype)
    kernel = kernel.astype(dtype)
    reference = jnp.einsum("rh,hr->r", x, jnp.take(kernel, targets, axis=1), preferred_element_type=jnp.float32)
    flops = 2.0 * rows * hidden * vocab

    def xla_gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.dot(x, kernel, preferred_element_type=jnp.float32)

    gemm = jax.jit(xla_gemm)
    expected = jax.nn.logsumexp(gemm(x, kernel), axis=-1)
    gemm_ms = median_ms(gemm, x, kernel, iters=iters, repeats=repeats)
    results = [{"variant": "xla_gemm", "config": None, "with_exp_ms": gemm_ms, "tflops": flops / gemm_ms / 1e9}]
    for config in configs:
        with_exp, stats_only = (
            jax.jit(functools.partial(logits_softmax_tiles, with_exp=flag, config=config, interpret=interpret))
            for flag in (True, False)
        )
        row = {
            "variant": "fused_matmul",
            "config": f"{config.block_rows}x{config.block_v}x{config.block_k}x{config.num_warps}x{config.num_stages}",
            "with_exp_ms": median_ms(with_exp, x, kernel, reference, iters=iters, repeats=repeats),
            "stats_ms": median_ms(stats_only, x, kernel, reference, iters=iters, repeats=repeats),
        }
        row["tflops"] = flops / row["with_exp_ms"] / 1e9
        logsumexp = combine_tiles(with_exp(x, kernel, reference)).logsumexp
        row["lse_max_diff"] = float(jnp.max(jnp.abs(logsumexp - expected)))
        results.append(row)
    return results


TILES_TABLE_COLUMNS = [
    ("variant", "variant", "{}"),
    ("config", "config", "{}"),
    ("GEMM + exp ms", "with_exp_ms", "{:.3f}"),
    ("stats only ms", "stats_ms", "{:.3f}"),
    ("TFLOP/s", "tflops", "{:.0f}"),
    ("lse diff", "lse_max_diff", "{:.1e}"),
]

KERNEL_TABLE_COLUMNS = [
    ("variant", "variant", "{}"),
    ("config", "config", "{}"),
    ("stats ms", "stats_ms", "{:.2f}"),
    ("stats + d ms", "grad_ms", "{:.2f}"),
    ("nll diff", "nll_max_diff", "{:.1e}"),
    ("d diff", "d_max_diff", "{:.1e}"),
    ("hits equal", "hits_equal", "{}"),
]

TABLE_COLUMNS = [
    ("chunk", "chunk_tokens", "{}"),
    ("statistics", "statistics", "{}"),
    ("logits", "logits_dtype", "{}"),
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
    parser.add_argument(
        "--statistics",
        nargs="+",
        choices=STATISTICS,
        default=["two_pass"],
        help="softmax statistics + logits gradient of each chunk, one row each per chunk size",
    )
    parser.add_argument(
        "--logits-dtypes",
        nargs="+",
        default=["float32"],
        help="the dtype the logits GEMM writes (float32, or e.g. bfloat16 as the plain head does), one row each per "
        "chunk size and statistics other than fused_matmul (which writes no logits)",
    )
    parser.add_argument(
        "--kernel-configs",
        nargs="*",
        default=[],
        help="time only the chunk statistics (two_pass and the fused kernel at these ROWSxCOLSxWARPSxSTAGES)",
    )
    parser.add_argument(
        "--one-read-configs",
        nargs="*",
        default=[],
        help="with --kernel-configs: also the one-read kernel (statistics one_read) at these ROWSxCOLSxWARPSxSTAGES",
    )
    parser.add_argument(
        "--kernel-rows", type=int, help="rows of the logits for --kernel-configs (default: tokens per chunk)"
    )
    parser.add_argument(
        "--tile-configs",
        nargs="*",
        default=[],
        help="time only one chunk's logits GEMM: XLA's and the fused_matmul kernel at these "
        "ROWSxCOLSxDEPTHxWARPSxSTAGES (rows: --kernel-rows)",
    )
    parser.add_argument(
        "--fused-tiles",
        help="launch parameters ROWSxCOLSxDEPTHxWARPSxSTAGES of the fused_matmul kernel (default: its default)",
    )
    parser.add_argument(
        "--profile",
        help="also trace the forward+backward of each row into this directory and print where its device time goes",
    )
    parser.add_argument("--interpret", action="store_true", help="run the Pallas kernel in interpret mode (CPU)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
    num_tokens = args.batch * args.seq_len
    chunk_rows = args.kernel_rows or -(-num_tokens // default_num_chunks(num_tokens, args.vocab))
    if args.tile_configs:
        configs = [LogitsTilesConfig.parse(text) for text in args.tile_configs]
        rows = bench_logits_tiles(
            chunk_rows, args.hidden, args.vocab, args.dtype, args.iters, args.repeats, configs, args.interpret
        )
        print(f"One chunk's logits GEMM on {device}: {chunk_rows}x{args.hidden}x{args.vocab} {args.dtype}")
        print(format_table(TILES_TABLE_COLUMNS, rows))
    elif args.kernel_configs:
        configs = [parse_kernel_config(text) for text in args.kernel_configs]
        one_read_configs = [parse_kernel_config(text) for text in args.one_read_configs]
        logits_dtype = args.logits_dtypes[0]
        rows = bench_chunk_terms(
            chunk_rows,
            args.vocab,
            args.dtype,
            args.iters,
            args.repeats,
            configs,
            args.interpret,
            one_read_configs,
            logits_dtype,
        )
        print(f"Chunk statistics on {device}: logits {chunk_rows}x{args.vocab} {logits_dtype}, d logits {args.dtype}")
        print(format_table(KERNEL_TABLE_COLUMNS, rows))
    else:
        rows = []
        runs = [
            (chunk_size, statistics, None if logits_dtype == "float32" else logits_dtype)
            for chunk_size in args.chunk_sizes or [None]
            for statistics in args.statistics
            for logits_dtype in (["float32"] if statistics == "fused_matmul" else args.logits_dtypes)
        ]
        for chunk_size, statistics, logits_dtype in runs:
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
                    statistics=statistics,
                    interpret=args.interpret,
                    tiles_config=LogitsTilesConfig.parse(args.fused_tiles) if args.fused_tiles else None,
                    profile_dir=args.profile,
                    logits_dtype=logits_dtype,
                )
            )
            if args.profile:
                from m2rnn_jax.bench.step_profile import format_tables

                row = rows[-1]
                print(f"chunk {row['chunk_tokens']} {statistics} {row['logits_dtype']}:")
                print(format_tables(row["profile"]))
        print(f"LM head + loss on {device}: N={args.batch}x{args.seq_len} h={args.hidden} V={args.vocab} {args.dtype}")
        print(format_table(TABLE_COLUMNS, rows))
    if args.json:
        write_json(args.json, {"shape": vars(args), "jax": jax.__version__, "rows": rows})
    else:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
