"""Trace and lower times of the trainer's train step, without XLA's compile: the Python side of every compile, cold
or warm from the compile cache (JAX computes the cache key from the lowered program, so these are never cached).

The step and its abstract inputs are ``m2rnn_jax.bench.model.abstract_train_step``'s (nothing is allocated: any
preset fits any machine), traced then lowered once in this process. Run each measurement in a fresh process: JAX's
and the step's trace caches make a second trace in the same process faster.

    python -m experiments.bench.trace_time --model hybrid-gdn-m2rnn-1l-7b --batch 1 --remat full --scan-layers \
        [--without-origin-messages]

``construct_s`` is one abstract construction of the decoder (``model_graphdef``: ``nnx.eval_shape`` of its
constructor), measured first. ``--without-origin-messages`` measures how much of these times goes into the error
text JAX builds whenever flax reads ``.sharding`` of a tracer (flax's RNG counter update does, once per parameter):
it replaces JAX's ``DynamicJaxprTracer._origin_msg`` by an empty string in this process, for the measurement only.
"""

from __future__ import annotations

import argparse
import json
import time

from m2rnn_jax.bench.model import abstract_train_step, resolve_config
from m2rnn_jax.train.state import model_graphdef


def without_origin_messages() -> None:
    """Makes JAX's tracer error texts skip the walk over the trace that names a value's origin (measurement only)."""
    from jax._src.interpreters import partial_eval

    partial_eval.DynamicJaxprTracer._origin_msg = lambda self: ""


def trace_and_lower_seconds(preset: str, batch: int, seq_len: int, remat: str | None, scan_layers: bool) -> dict:
    """{"construct_s", "trace_s", "lower_s"}: the decoder's abstract construction, then the trace and the lowering
    of the preset's train step at (batch, seq_len)."""
    config = resolve_config(preset, remat=remat, scan_layers=scan_layers)
    start = time.perf_counter()
    model_graphdef(config)
    construct_s = time.perf_counter() - start
    step, state, tokens = abstract_train_step(config, batch, seq_len)
    start = time.perf_counter()
    traced = step.trace(state, tokens)
    traced_at = time.perf_counter()
    traced.lower()
    return {"construct_s": construct_s, "trace_s": traced_at - start, "lower_s": time.perf_counter() - traced_at}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a preset name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--remat", default=None, help="none / full / save_dots (default: the preset's)")
    parser.add_argument("--scan-layers", action="store_true", help="scan over repeated blocks")
    parser.add_argument(
        "--without-origin-messages", action="store_true", help="JAX's tracer error texts without the origin walk"
    )
    args = parser.parse_args(argv)
    if args.without_origin_messages:
        without_origin_messages()
    times = trace_and_lower_seconds(args.model, args.batch, args.seq_len, args.remat, args.scan_layers)
    row = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len, **times}
    print(json.dumps({**row, "without_origin_messages": args.without_origin_messages}))


if __name__ == "__main__":
    main()
