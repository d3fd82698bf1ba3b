"""Per-device memory of one mixer layer's training step at long context, from XLA's compiled memory analysis.

    python -m m2rnn_jax.bench.context_memory --preset hybrid-m2rnn-400m --mixer m2rnn --seq-len 65536 \\
        --context 1 8

compiles (never runs) ``value_and_grad`` of one mixer layer (forward and backward, gradients of the parameters
and the input) for a batch of ``--batch`` sequences of ``--seq-len`` tokens on a mesh whose ``context`` axis has
each given size, and prints the bytes per device XLA plans: arguments, outputs, temporaries (activations and the
backward's residuals), and their sum. On CPU run it with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(at least the largest context size); the recurrences then run their scan backends, whose memory profile is not
the GPU/TPU kernels'.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def layer_step_memory(preset: str, mixer: str, seq_len: int, batch: int, context: int) -> dict[str, Any]:
    """{"arguments", "outputs", "temporaries", "total"} bytes per device of one mixer layer's compiled
    value_and_grad step, on a mesh of ``context`` devices along the sequence (1: one device, no mesh)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax.models.mixers import MIXERS
    from m2rnn_jax.models.presets import get_preset
    from m2rnn_jax.parallel.mesh import build_mesh

    config = get_preset(preset)
    spec = next((s for s in MIXERS if s.field == mixer), None)
    if spec is None or getattr(config, mixer, None) is None:
        raise ValueError(f"--mixer: expected a mixer of preset {preset!r}, got {mixer!r}")
    layer = nnx.eval_shape(
        lambda: spec.module_class(
            config.hidden_size,
            getattr(config, mixer),
            num_layers=config.num_layers,
            dtype=config.compute_dtype,
            param_dtype=config.parameter_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, params = nnx.split(layer)

    def loss(params: nnx.State, x: jax.Array) -> jax.Array:
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(y.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    x = jax.ShapeDtypeStruct((batch, seq_len, config.hidden_size), config.compute_dtype)
    if context == 1:
        compiled = step.lower(params, x).compile()
    else:
        mesh = build_mesh({"context": context}, devices=jax.devices()[:context])
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(None, "context")))
        with jax.set_mesh(mesh):
            compiled = step.lower(params, x).compile()
    analysis = compiled.memory_analysis()
    sizes = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }
    sizes["total"] = sum(sizes.values())
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m m2rnn_jax.bench.context_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="hybrid-m2rnn-400m")
    parser.add_argument("--mixer", default="m2rnn", help="config field of the mixer (m2rnn, gdn, mamba2, ...)")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() < max(args.context):
        raise SystemExit(
            f"--context: expected at most {jax.device_count()} devices here, got {max(args.context)}; "
            f"on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={max(args.context)}"
        )
    gib = 2.0**30
    print(
        f"{args.preset} {args.mixer} layer, batch {args.batch} x {args.seq_len} tokens, value_and_grad, GiB per device"
    )
    print(f"{'context':>8} {'arguments':>10} {'outputs':>10} {'temporaries':>12} {'total':>10}")
    for context in args.context:
        sizes = layer_step_memory(args.preset, args.mixer, args.seq_len, args.batch, context)
        print(
            f"{context:>8} {sizes['arguments'] / gib:>10.3f} {sizes['outputs'] / gib:>10.3f} "
            f"{sizes['temporaries'] / gib:>12.3f} {sizes['total'] / gib:>10.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
