"""The M2RNN op on one device against the same op split over all devices: heads over ``tensor``, time over ``context``.

    python -m experiments.multi_gpu.op_parallel --shape 400m --json op.json            # the paper's 400M layer
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.multi_gpu.op_parallel --shape smoke --json op.json          # the CPU twin

Layouts (G = all devices):

* ``one``: the op on the first device alone (``m2rnn_jax.m2rnn``);
* ``tensor``: the op under a mesh ``tensor = t, data = G / t`` (t the largest divisor of G that divides the heads;
  the op's own ``shard_map`` splits heads over ``tensor`` and sequences over ``data``, no communication);
* ``context``: :func:`m2rnn_jax.parallel.context.context_m2rnn` under ``context = G`` (the sequence in G
  contiguous shards, the pipeline of micro-batches between them).

Each row: forward ms and forward+backward ms (``jax.vjp`` + pullback of a fixed random cotangent, the gradients of
q, k, v, W, f; medians of :func:`m2rnn_jax.bench.timing.median_ms`), the speed-up against ``one``, and the largest
relative L2 difference of y and every gradient against ``one`` (``max_rel_diff``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2rnn_jax import m2rnn
from m2rnn_jax.bench.op import GRADIENT_CLIPPING, NAMES, SHAPES, Shape, forward_and_training_step, make_inputs
from m2rnn_jax.bench.timing import median_ms
from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.parallel.context import context_m2rnn
from m2rnn_jax.parallel.mesh import build_mesh

SMOKE_SHAPE = Shape(2, 64, 8, 16, 8, 1, 1, "float32")


def shape_by_name(name: str) -> Shape:
    """``smoke`` (CPU twin: B=2, S=64, N=8, K=16, V=8, float32) or a shape of :data:`m2rnn_jax.bench.op.SHAPES`."""
    if name == "smoke":
        return SMOKE_SHAPE
    if name not in SHAPES:
        raise ValueError(f"--shape: expected 'smoke' or one of {sorted(SHAPES)}, got {name!r}")
    return SHAPES[name]


def tensor_size(num_devices: int, num_heads: int) -> int:
    """The largest divisor of ``num_devices`` that divides ``num_heads`` (the head split of the tensor layout)."""
    return max(t for t in range(1, num_devices + 1) if num_devices % t == 0 and num_heads % t == 0)


def layouts(shape: Shape, num_devices: int) -> dict[str, dict[str, int] | None]:
    """Layout name -> mesh axis sizes (None: the first device alone)."""
    t = tensor_size(num_devices, shape.num_heads)
    return {"one": None, "tensor": {"tensor": t, "data": num_devices // t}, "context": {"context": num_devices}}


def input_specs(shape: Shape, layout: str) -> dict[str, P]:
    """How each input is laid out: heads over tensor (a broadcast head count of 1 replicated), time over context."""
    if layout == "context":
        sequence = P(None, "context")
        return {"q": sequence, "k": sequence, "v": sequence, "f": sequence, "W": P()}

    def heads(count: int, rank: int) -> P:
        entries: list[Any] = ["data"] + [None] * (rank - 1)
        if count == shape.num_heads:
            entries[2] = "tensor"
        return P(*entries)

    return {
        "q": heads(shape.num_q_heads, 4),
        "k": heads(shape.num_k_heads, 4),
        "v": heads(shape.num_heads, 4),
        "f": heads(shape.num_heads, 3),
        "W": P("tensor"),
    }


def op_for(layout: str) -> Callable[[dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """args dict -> (y, h_final) of the layout (the mesh is the one set around tracing)."""
    if layout == "context":
        return lambda a: context_m2rnn(*(a[n] for n in NAMES), gradient_clipping=GRADIENT_CLIPPING)
    return lambda a: m2rnn(**a, gradient_clipping=GRADIENT_CLIPPING)


def relative_difference(value: jax.Array, reference: jax.Array) -> float:
    """||value - reference|| / ||reference|| in float64 on the host."""
    value, reference = (np.asarray(jax.device_get(x), np.float64) for x in (value, reference))
    return float(np.linalg.norm(value - reference) / max(np.linalg.norm(reference), 1e-30))


def bench_layout(
    shape: Shape, layout: str, sizes: dict[str, int] | None, *, iters: int, repeats: int
) -> tuple[dict, Any]:
    """One row: the layout's forward and forward+backward ms and its outputs (y, gradients) for the comparison."""
    args = make_inputs(shape)
    dy = jax.random.normal(jax.random.PRNGKey(1), (shape.batch, shape.seq_len, shape.num_heads, shape.v_dim))
    dy = dy.astype(shape.dtype)
    forward, fwd_bwd = forward_and_training_step(op_for(layout))
    if sizes is None:
        device = jax.devices()[0]
        args, dy = jax.device_put((args, dy), device)
        mesh = None
    else:
        mesh = build_mesh(sizes)
        specs = input_specs(shape, layout)
        args = {name: jax.device_put(x, NamedSharding(mesh, specs[name])) for name, x in args.items()}
        dy = jax.device_put(dy, NamedSharding(mesh, specs["v"]))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        forward_call = forward.lower(args).compile()
        fwd_bwd_call = fwd_bwd.lower(args, dy).compile()
        outputs = fwd_bwd_call(args, dy)
        row = {
            "layout": layout,
            "mesh": sizes or {"devices": 1},
            "shape": shape.label(),
            "forward_ms": median_ms(forward_call, args, iters=iters, repeats=repeats, warmup=2),
            "fwd_bwd_ms": median_ms(fwd_bwd_call, args, dy, iters=iters, repeats=repeats, warmup=2),
        }
    return row, outputs


def run(shape: Shape, *, iters: int, repeats: int) -> list[dict]:
    """Rows of every layout; a failing layout gets an ``error`` and the others still run."""
    rows, reference = [], None
    for layout, sizes in layouts(shape, jax.device_count()).items():
        try:
            row, (y, grads) = bench_layout(shape, layout, sizes, iters=iters, repeats=repeats)
        except Exception as err:  # report and keep going: one failing layout must not hide the others
            rows.append({"layout": layout, "mesh": sizes, "error": f"{type(err).__name__}: {err}"[:2000]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            continue
        flat = [y, *(grads[name] for name in NAMES)]
        if reference is None:
            reference, base = flat, row
        else:
            row["max_rel_diff"] = max(relative_difference(a, b) for a, b in zip(flat, reference))
            row["forward_speedup"] = base["forward_ms"] / row["forward_ms"]
            row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="400m", help="'smoke' or a shape of m2rnn_jax.bench.op.SHAPES")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True, help="where the rows go")
    args = parser.parse_args(argv)
    shape = shape_by_name(args.shape)
    rows = run(shape, iters=args.iters, repeats=args.repeats)
    device = jax.devices()[0]
    result = {"device": f"{jax.device_count()} x {device.platform}:{device.device_kind}", "rows": rows}
    with atomic_file(args.json) as temporary:
        temporary.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
