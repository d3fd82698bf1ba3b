"""The short conv and RMSNorm with their custom VJPs against the plain formulas differentiated by JAX: forward and
forward+backward timed side by side, with outputs and every gradient compared to the plain formula.

    python -m experiments.bench.norm_conv_check [--batch 8 --seq-len 4096 --dtype bfloat16]

Cases (the shapes of hybrid-gdn-m2rnn-1l-400m): ``conv`` (B, S, 2048) with 4 taps, SiLU, no bias, float32 kernel
and zero state (the GDN qkv conv in training); ``norm`` (B, S, 1024) (the residual-stream RMSNorm); ``o_norm``
(B, S, 2, 512) (GDN's per-head norm). Inputs and outputs in ``--dtype``, parameters float32. One line per case and
variant: ``reference`` (autodiff) and ``custom_vjp`` (the layers' path; for the conv its "jnp" backend), for the
conv also ``pallas_gpu`` (the fused Pallas-Triton kernels) and ``pallas_gpu_transpose`` (XLA's dz, then the backward
kernel; both NVIDIA GPUs only, skipped elsewhere), then the ratios to the reference.

``--conv-configs block_s,block_c,blocks_per_program,num_warps,num_stages ...`` also times the two conv kernels
alone for each launch configuration (forward kernel; backward kernel), with their effective bandwidth (bytes the
kernel must move: forward reads x, writes y; backward reads x and dy, writes dx).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from m2rnn_jax.bench.timing import median_ms, temp_bytes, to_gib
from m2rnn_jax.layers.conv import causal_conv, causal_conv_reference
from m2rnn_jax.layers.norm import rms_norm, rms_norm_reference
from m2rnn_jax.ops.platform import on_nvidia_gpu
from m2rnn_jax.testing import max_relative_error
from pallas_kernels.gpu.causal_conv import ConvKernelConfig, causal_conv_backward, causal_conv_forward


def conv_case(fn: Callable, dtype: jnp.dtype) -> Callable:
    """(x, state, kernel) -> y of the GDN conv (SiLU, no bias) through ``fn``."""
    return lambda x, state, kernel: fn(x, state, kernel, None, activation="silu", dtype=dtype)[0]


def norm_case(fn: Callable, dtype: jnp.dtype) -> Callable:
    """(x, scale) -> y through ``fn`` with eps 1e-5."""
    return lambda x, scale: fn(x, scale, eps=1e-5, dtype=dtype)


def case_inputs(batch: int, seq_len: int, dtype: jnp.dtype) -> dict[str, tuple[Callable, tuple[jax.Array, ...]]]:
    """name -> (builder of the function from (fn, dtype), primal inputs)."""
    keys = jax.random.split(jax.random.key(0), 5)
    conv_x = jax.random.normal(keys[0], (batch, seq_len, 2048), jnp.float32).astype(dtype)
    norm_x = jax.random.normal(keys[1], (batch, seq_len, 1024), jnp.float32).astype(dtype)
    head_x = jax.random.normal(keys[2], (batch, seq_len, 2, 512), jnp.float32).astype(dtype)
    kernel = 0.3 * jax.random.normal(keys[3], (4, 2048), jnp.float32)
    return {
        "conv": (conv_case, (conv_x, jnp.zeros((batch, 3, 2048), dtype), kernel)),
        "norm": (norm_case, (norm_x, 1.0 + 0.1 * jax.random.normal(keys[4], (1024,), jnp.float32))),
        "o_norm": (norm_case, (head_x, 1.0 + 0.1 * jax.random.normal(keys[4], (512,), jnp.float32))),
    }


VARIANTS = {
    "conv": {
        "reference": causal_conv_reference,
        "custom_vjp": functools.partial(causal_conv, backend="jnp"),
        "pallas_gpu": functools.partial(causal_conv, backend="pallas_gpu"),
        "pallas_gpu_transpose": functools.partial(causal_conv, backend="pallas_gpu_transpose"),
    },
    "norm": {"reference": rms_norm_reference, "custom_vjp": rms_norm},
    "o_norm": {"reference": rms_norm_reference, "custom_vjp": rms_norm},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--conv-configs", type=parse_config, nargs="*", default=[], help=parse_config.__doc__)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; B={args.batch} S={args.seq_len} "
        f"{args.dtype} inputs/outputs, float32 parameters"
    )
    for case, (build, primals) in case_inputs(args.batch, args.seq_len, dtype).items():
        times, results = {}, {}
        dy = jax.random.normal(jax.random.key(1), primals[0].shape, jnp.float32).astype(dtype)
        for variant, fn in VARIANTS[case].items():
            if variant.startswith("pallas_gpu") and not on_nvidia_gpu():
                print(f"{case:7s} {variant:10s} skipped: needs an NVIDIA GPU")
                continue
            forward = jax.jit(build(fn, dtype))
            gradient = jax.jit(lambda dy, *p, f=forward: jax.vjp(f, *p)[1](dy))  # every input's cotangent
            results[variant] = (forward(*primals), *gradient(dy, *primals))
            compiled = gradient.lower(dy, *primals).compile()
            times[variant] = (
                median_ms(forward, *primals, iters=args.iters),
                median_ms(gradient, dy, *primals, iters=args.iters),
            )
            error = max(
                max_relative_error(a.astype(jnp.float32), b.astype(jnp.float32))
                for a, b in zip(results[variant], results["reference"], strict=True)
            )
            print(
                f"{case:7s} {variant:10s} forward {times[variant][0]:8.3f} ms   forward+backward "
                f"{times[variant][1]:8.3f} ms   temporaries {to_gib(temp_bytes(compiled)) or 0:6.2f} GiB   "
                f"max rel. error vs reference (y and every gradient) {error:.1e}"
            )
        ref_f, ref_b = times.pop("reference")
        for variant, (new_f, new_b) in times.items():
            print(
                f"{case:7s} reference / {variant}: forward {ref_f / new_f:5.2f}x   "
                f"forward+backward {ref_b / new_b:5.2f}x"
            )
    if args.conv_configs:
        time_conv_kernels(args.batch, args.seq_len, dtype, args.conv_configs, args.iters)


def parse_config(text: str) -> ConvKernelConfig:
    """ "block_s,block_c,blocks_per_program,num_warps,num_stages" -> ConvKernelConfig."""
    values = [int(v) for v in text.split(",")]
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"conv config: expected 5 comma-separated ints, got {text!r}")
    return ConvKernelConfig(*values)


def time_conv_kernels(batch: int, seq_len: int, dtype: jnp.dtype, configs: list[ConvKernelConfig], iters: int):
    """One line per launch configuration: the forward and the backward kernel of the GDN conv alone."""
    _, (x, state, kernel) = case_inputs(batch, seq_len, dtype)["conv"]
    dy = jax.random.normal(jax.random.key(1), x.shape, jnp.float32).astype(dtype)
    if not on_nvidia_gpu():
        print("conv kernels skipped: need an NVIDIA GPU")
        return
    gigabytes = x.size * x.dtype.itemsize / 1e9  # one pass over a (B, S, C) array
    for config in configs:
        forward = jax.jit(
            lambda x, state, kernel, c=config: causal_conv_forward(
                x, state, kernel, None, activation=jax.nn.silu, out_dtype=dtype, config=c
            )
        )
        backward = jax.jit(
            lambda x, state, kernel, dy, c=config: causal_conv_backward(
                x, state, kernel, None, dy, activation=jax.nn.silu, config=c
            )
        )
        forward_ms = median_ms(forward, x, state, kernel, iters=iters)
        backward_ms = median_ms(backward, x, state, kernel, dy, iters=iters)
        print(
            f"conv kernels {config}: forward {forward_ms:7.3f} ms ({2e3 * gigabytes / forward_ms:6.0f} GB/s)   "
            f"backward {backward_ms:7.3f} ms ({3e3 * gigabytes / backward_ms:6.0f} GB/s)"
        )


if __name__ == "__main__":
    main()
