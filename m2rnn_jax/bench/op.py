"""Benchmark of the M2RNN op backends: forward ms, forward+backward ms, ns per step, memory.

    m2rnn-jax bench                                    # paper shapes, every backend this machine runs
    m2rnn-jax bench --shapes 400m --backends pallas_gpu scan --json out.json
    python -m m2rnn_jax bench --shapes 400m-b1         # the same without the installed script

Inputs are random and realistic (``m2rnn_jax.testing``), h0 = None (training starts every sequence from zeros),
gradient clipping 1 (the paper's configs). Forward+backward is one jitted call of ``jax.vjp`` and its pullback
with a fixed random cotangent for y, i.e. everything a training step spends on the op, including the head sums
of broadcast-head gradients. Times are medians over repeats of ``iters`` back-to-back calls after warm-up, taken
with ``block_until_ready``. Memory is the compiled executable's temporary allocation (``memory_analysis``):
device memory beyond the arguments and outputs (inputs, dy; y and the gradients).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from m2rnn_jax import m2rnn
from m2rnn_jax.bench.report import format_table as layout_table
from m2rnn_jax.bench.report import write_json
from m2rnn_jax.bench.timing import compile_timed, median_ms, peak_bytes, temp_bytes, to_gib
from m2rnn_jax.ops.m2rnn.pallas_gpu import m2rnn_pallas_gpu
from m2rnn_jax.testing import random_m2rnn_inputs
from pallas_kernels.gpu.m2rnn_common import KernelConfig

NAMES = ("q", "k", "v", "W", "f")
GRADIENT_CLIPPING = 1.0
WARMUP = 2  # calls before timing (the runs in experiments/RESULTS.md used two)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    num_heads: int
    k_dim: int
    v_dim: int
    num_q_heads: int
    num_k_heads: int
    dtype: str = "bfloat16"

    def label(self) -> str:
        return (
            f"B={self.batch} S={self.seq_len} N={self.num_heads} K={self.k_dim} V={self.v_dim} "
            f"Nq={self.num_q_heads} Nk={self.num_k_heads} {self.dtype}"
        )


SHAPES = {
    "400m": Shape(8, 4096, 84, 64, 16, 1, 1),
    "400m-b1": Shape(1, 4096, 84, 64, 16, 1, 1),
    "400m-s16k": Shape(8, 16384, 84, 64, 16, 1, 1),
    "400m-b1-s16k": Shape(1, 16384, 84, 64, 16, 1, 1),
    "7b": Shape(4, 4096, 132, 64, 16, 1, 1),
    "tiny": Shape(2, 64, 4, 16, 16, 1, 1, "float32"),
    # the M2RNN layer of the state-tracking comparison (experiments/state_tracking/models.py) at its batch and length
    "state-tracking": Shape(128, 128, 4, 2, 64, 4, 4, "float32"),
    "state-tracking-bf16": Shape(128, 128, 4, 2, 64, 4, 4),
}


def make_inputs(shape: Shape, seed: int = 0) -> dict[str, jax.Array]:
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(seed),
        batch=shape.batch,
        seq_len=shape.seq_len,
        num_heads=shape.num_heads,
        k_dim=shape.k_dim,
        v_dim=shape.v_dim,
        num_q_heads=shape.num_q_heads,
        num_k_heads=shape.num_k_heads,
        dtype=jnp.dtype(shape.dtype),
        with_h0=False,
    )
    return {name: inputs[name] for name in NAMES}


def op_function(backend: str, config: KernelConfig | None = None) -> Callable:
    """args dict -> (y, h_final) through the public op, or through the GPU backend with explicit launch params."""
    if config is None:
        return lambda a: m2rnn(**a, gradient_clipping=GRADIENT_CLIPPING, backend=backend)

    def fn(a):
        y, h = m2rnn_pallas_gpu(
            *(a[n] for n in NAMES),
            None,
            cu_seqlens=None,
            gradient_clipping=GRADIENT_CLIPPING,
            state_dtype=jnp.float32,
            interpret=False,
            config=config,
        )
        return y.astype(a["q"].dtype), h.astype(a["q"].dtype)

    return fn


def forward_and_training_step(fn: Callable) -> tuple[Callable, Callable]:
    """Jitted forward (args) -> y and forward+backward (args, dy) -> (y, grads of q, k, v, W, f).

    The training step returns y too (the next layer consumes it), so its temporary memory is what the op needs
    beyond its inputs, output and gradients.
    """
    forward = jax.jit(lambda a: fn(a)[0])

    def fwd_bwd(a, dy):
        (y, h), pullback = jax.vjp(fn, a)
        return y, pullback((dy, jnp.zeros_like(h)))[0]

    return forward, jax.jit(fwd_bwd)


def bench(
    shape: Shape,
    backend: str,
    *,
    config: KernelConfig | None = None,
    variant: str = "default",
    with_backward: bool = True,
    iters: int = 10,
    repeats: int = 5,
) -> dict:
    """One table row: shape, backend, variant, forward ms, forward+backward ms, ns per step, memory."""
    args = make_inputs(shape)
    forward, fwd_bwd = forward_and_training_step(op_function(backend, config))
    y = jax.eval_shape(forward, args)
    dy = jax.random.normal(jax.random.PRNGKey(1), y.shape, jnp.float32).astype(y.dtype)
    row = {
        "shape": shape.label(),
        **dataclasses.asdict(shape),
        "backend": backend,
        "variant": variant,
        "config": None if config is None else dataclasses.asdict(config),
    }
    forward_call = compile_timed(forward, args).executable
    row["forward_ms"] = median_ms(forward_call, args, iters=iters, repeats=repeats, warmup=WARMUP)
    row["forward_ns_per_step"] = row["forward_ms"] * 1e6 / shape.seq_len
    row["forward_temp_gib"] = to_gib(temp_bytes(forward_call))
    if with_backward:
        fwd_bwd_call = compile_timed(fwd_bwd, args, dy).executable
        row["fwd_bwd_ms"] = median_ms(fwd_bwd_call, args, dy, iters=iters, repeats=repeats, warmup=WARMUP)
        row["fwd_bwd_ns_per_step"] = row["fwd_bwd_ms"] * 1e6 / shape.seq_len
        row["fwd_bwd_temp_gib"] = to_gib(temp_bytes(fwd_bwd_call))
    row["peak_device_gib"] = to_gib(peak_bytes())
    return row


COLUMNS = (
    ("shape", "shape", "{}"),
    ("backend", "backend", "{}"),
    ("variant", "variant", "{}"),
    ("fwd ms", "forward_ms", "{:.3f}"),
    ("fwd+bwd ms", "fwd_bwd_ms", "{:.3f}"),
    ("fwd ns/step", "forward_ns_per_step", "{:.0f}"),
    ("fwd+bwd ns/step", "fwd_bwd_ns_per_step", "{:.0f}"),
    ("fwd+bwd temp GiB", "fwd_bwd_temp_gib", "{:.3f}"),
    ("peak GiB (process)", "peak_device_gib", "{:.2f}"),
    ("note", "note", "{}"),
)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a text table; a row that failed shows ERROR in its note column (the JSON holds the message)."""
    return layout_table(COLUMNS, [{**row, "note": "ERROR"} if "error" in row else row for row in rows])


def default_backends() -> list[str]:
    on_gpu = jax.default_backend() == "gpu"
    return ["pallas_gpu", "scan"] if on_gpu else ["scan"]


def run(shapes: Sequence[str], backends: Sequence[str], json_path: str | None, iters: int, repeats: int) -> int:
    rows = []
    for shape_name in shapes:
        for backend in backends:
            try:
                rows.append(bench(SHAPES[shape_name], backend, iters=iters, repeats=repeats))
            except Exception as err:  # report and keep going: one failing backend must not hide the others
                rows.append(
                    {
                        "shape": SHAPES[shape_name].label(),
                        "backend": backend,
                        "variant": "default",
                        "error": f"{type(err).__name__}: {err}"[:2000],
                    }
                )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if json_path:
        write_json(json_path, {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows})
    print(format_table(rows))
    return 0
