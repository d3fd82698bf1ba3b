"""Ahead-of-time compile of the TPU kernels for virtual TPU topologies, on a machine without TPUs.

Needs libtpu (``pip install "jax[tpu]==<jax version>"``, see .ci/install_tpu.sh). For each topology this builds a
mesh over the topology's virtual devices and runs the real Mosaic TPU compiler (``jit(...).trace().lower()
.compile()``) on:

- forward:    the op (backend="pallas_tpu") under ``jax.shard_map`` over (batch, heads), bf16 inputs, Nq = Nk = 1;
- backward:   ``jax.grad`` of a loss through the same sharded op (forward with checkpoints + backward kernel);
- varlen:     forward + backward of packed sequences with ``cu_seqlens`` (one shard per device);
- train_step: one optax step of the ``m2rnn_jax.layers.M2RNN`` mixer, data-parallel under ``jax.shard_map``.

Usage: python -m m2rnn_jax.bench.tpu_aot --topology v5e:2x2 --topology v6e:2x2
Exit status 0 when every compile succeeds; the failures are printed with their compiler message otherwise.
It proves that Mosaic accepts the kernels for those chips, not their numerics or speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

TARGETS = ("forward", "backward", "varlen", "train_step")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Global sizes of the compiled calls (default: the paper's 400M M2RNN layer at one micro-batch)."""

    batch: int = 8
    seq_len: int = 4096
    num_heads: int = 84
    num_qk_heads: int = 1
    k_dim: int = 64
    v_dim: int = 16
    hidden: int = 1024
    dtype: str = "bfloat16"


def topology_mesh(topology: str, axis_names: tuple[str, ...], axis_sizes: tuple[int, ...] | None = None) -> Mesh:
    """A mesh over the virtual devices of ``topology`` (e.g. "v5e:2x2"); all devices on the first axis by default."""
    from jax.experimental import topologies

    devices = np.array(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    sizes = axis_sizes or (devices.size,) + (1,) * (len(axis_names) - 1)
    return Mesh(devices.reshape(sizes), axis_names)


def _spec(mesh: Mesh, shape: tuple[int, ...], dtype, pspec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))


def _op_inputs(mesh: Mesh, s: Shape):
    """Abstract dense op inputs sharded over (data, heads); q and k (``num_qk_heads`` heads) are sharded on heads
    too when they have more than one head, else replicated."""
    dtype = jnp.dtype(s.dtype)
    return (
        _spec(mesh, (s.batch, s.seq_len, s.num_qk_heads, s.k_dim), dtype, _qk_spec(s)),
        _spec(mesh, (s.batch, s.seq_len, s.num_qk_heads, s.k_dim), dtype, _qk_spec(s)),
        _spec(mesh, (s.batch, s.seq_len, s.num_heads, s.v_dim), dtype, P("data", None, "heads")),
        _spec(mesh, (s.num_heads, s.v_dim, s.v_dim), dtype, P("heads")),
        _spec(mesh, (s.batch, s.seq_len, s.num_heads), dtype, P("data", None, "heads")),
        _spec(mesh, (s.batch, s.num_heads, s.k_dim, s.v_dim), jnp.float32, P("data", "heads")),
    )


def _qk_spec(s: Shape) -> P:
    return P("data") if s.num_qk_heads == 1 else P("data", None, "heads")


def _sharded_op(mesh: Mesh, s: Shape):
    from m2rnn_jax.ops import m2rnn

    qk = _qk_spec(s)
    specs = (qk, qk, P("data", None, "heads"), P("heads"), P("data", None, "heads"), P("data", "heads"))

    def local(q, k, v, w, f, h0):
        return m2rnn(q, k, v, w, f, h0, gradient_clipping=1.0, backend="pallas_tpu")

    return jax.shard_map(
        local, mesh=mesh, in_specs=specs, out_specs=(P("data", None, "heads"), P("data", "heads")), check_vma=False
    )


def _loss(fn):
    def loss(*args):
        y, final = fn(*args)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final.astype(jnp.float32))

    return loss


def compile_forward(topology: str, s: Shape):
    mesh = topology_mesh(topology, ("data", "heads"), (2, -1))
    return jax.jit(_sharded_op(mesh, s)).trace(*_op_inputs(mesh, s)).lower().compile()


def compile_backward(topology: str, s: Shape):
    mesh = topology_mesh(topology, ("data", "heads"), (2, -1))
    grad = jax.grad(_loss(_sharded_op(mesh, s)), argnums=(0, 1, 2, 3, 4, 5))
    return jax.jit(grad).trace(*_op_inputs(mesh, s)).lower().compile()


def compile_varlen(topology: str, s: Shape):
    """Each device holds its own packed stream of ``s.batch // devices`` sequences with their cu_seqlens."""
    from m2rnn_jax.ops import m2rnn

    mesh = topology_mesh(topology, ("data",))
    devices = mesh.devices.size
    seqs, tokens = s.batch // devices, s.seq_len
    dtype = jnp.dtype(s.dtype)

    def local(q, k, v, w, f, h0, cu):
        return m2rnn(q[0], k[0], v[0], w, f[0], h0, cu_seqlens=cu[0], gradient_clipping=1.0, backend="pallas_tpu")

    specs = (P("data"),) * 3 + (P(),) + (P("data"),) * 3
    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P("data"), P("data")), check_vma=False)
    grad = jax.grad(lambda *a: _loss(sharded)(*a), argnums=(0, 1, 2, 3, 4, 5))
    args = (
        _spec(mesh, (devices, tokens, s.num_qk_heads, s.k_dim), dtype, P("data")),
        _spec(mesh, (devices, tokens, s.num_qk_heads, s.k_dim), dtype, P("data")),
        _spec(mesh, (devices, tokens, s.num_heads, s.v_dim), dtype, P("data")),
        _spec(mesh, (s.num_heads, s.v_dim, s.v_dim), dtype, P()),
        _spec(mesh, (devices, tokens, s.num_heads), dtype, P("data")),
        _spec(mesh, (devices * seqs, s.num_heads, s.k_dim, s.v_dim), jnp.float32, P("data")),
        _spec(mesh, (devices, seqs + 1), jnp.int32, P("data")),
    )
    return jax.jit(grad).trace(*args).lower().compile()


def compile_train_step(topology: str, s: Shape):
    """One AdamW step of the M2RNN mixer (bf16 compute, f32 params), data-parallel with a gradient pmean."""
    import optax
    from flax import nnx

    from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig

    mesh = topology_mesh(topology, ("data",))
    config = M2RNNConfig(
        num_heads=s.num_heads,
        num_q_heads=s.num_qk_heads,
        num_k_heads=s.num_qk_heads,
        k_head_dim=s.k_dim,
        v_head_dim=s.v_dim,
        gradient_clipping=1.0,
        backend="pallas_tpu",
    )
    dtype = jnp.dtype(s.dtype)
    abstract = nnx.eval_shape(lambda: M2RNN(s.hidden, config, num_layers=24, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.1)

    def loss_fn(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        grads = jax.lax.pmean(grads, "data")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, "data")

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P(), P()), check_vma=False)
    replicated = NamedSharding(mesh, P())

    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    params_abs = jax.tree.map(place, params)
    opt_abs = jax.tree.map(place, jax.eval_shape(tx.init, params))
    x_abs = _spec(mesh, (s.batch, s.seq_len, s.hidden), dtype, P("data"))
    return jax.jit(sharded, donate_argnums=(0, 1)).trace(params_abs, opt_abs, x_abs).lower().compile()


COMPILERS: dict[str, Callable] = {
    "forward": compile_forward,
    "backward": compile_backward,
    "varlen": compile_varlen,
    "train_step": compile_train_step,
}


def run(topologies: list[str], targets: list[str], shape: Shape) -> int:
    """Compile every target for every topology; print one line each; return the number of failures."""
    failures = 0
    for topology in topologies:
        for target in targets:
            start = time.perf_counter()
            try:
                compiled = COMPILERS[target](topology, shape)
            except Exception:  # report the compiler message and keep going
                failures += 1
                print(f"FAIL {topology} {target}", flush=True)
                traceback.print_exc()
                continue
            memory = compiled.memory_analysis()
            temp = "" if memory is None else f" temp {memory.temp_size_in_bytes / 2**20:.1f} MiB"
            print(f"ok   {topology} {target} compiled in {time.perf_counter() - start:.1f} s{temp}", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", action="append", help="e.g. v5e:2x2 (repeatable; default v5e:2x2 and v6e:2x2)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="default: all")
    for field in dataclasses.fields(Shape):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=str if field.type == "str" else int)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name) is not None}
    shape = Shape(**overrides)
    failures = run(args.topology or ["v5e:2x2", "v6e:2x2"], args.target or list(TARGETS), shape)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
