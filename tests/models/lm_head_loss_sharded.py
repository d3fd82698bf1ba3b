"""Run with 8 fake CPU devices (``tests/models/test_lm_head_loss.py`` starts it in a subprocess): the chunked head
with tokens split over the devices equals the single-device result, and with one token group per device the kernel
gradient is all-reduced once after the chunk loop instead of inside it; the train step takes one group per batch
shard of the mesh it is traced under.

Prints one ``name value`` line per fact.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from m2rnn_jax.models.lm_head_loss import lm_head_cross_entropy
from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.train.step import _batch_shards

DEVICES = 8


def collectives_in_loops(hlo: str) -> int:
    """Number of collectives (all-reduce, all-gather, reduce-scatter, all-to-all) inside while-loop bodies."""
    bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo))
    count = 0
    for computation in re.split(r"\n(?=\S)", hlo):
        header = computation.split("(", 1)[0].split()
        if header and header[-1].lstrip("%") in bodies:
            count += len(re.findall(r"(?:all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", computation))
    return count


def main() -> None:
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    keys = jax.random.split(jax.random.key(0), 3)
    num_tokens, width, vocab = DEVICES * 24, 16, 64
    hidden = jax.random.normal(keys[0], (num_tokens, width))
    kernel = jax.random.normal(keys[1], (width, vocab)) * 0.3
    targets = jax.random.randint(keys[2], (num_tokens,), 0, vocab, dtype=jnp.int32)

    def loss_and_grads(groups: int):
        def loss(hidden, kernel):
            out = lm_head_cross_entropy(hidden, kernel, targets, chunk_size=8, groups=groups)
            return out.nll_sum / out.weight_sum

        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    expected, expected_grads = loss_and_grads(1)(hidden, kernel)
    sharded_hidden = jax.device_put(hidden, NamedSharding(mesh, PartitionSpec("data")))
    for groups in (1, DEVICES):
        fn = loss_and_grads(groups)
        value, grads = fn(sharded_hidden, kernel)
        error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(grads, expected_grads))
        print(f"groups{groups}_value_error {abs(float(value) - float(expected)):.3g}")
        print(f"groups{groups}_grad_error {error:.3g}")
        hlo = fn.lower(sharded_hidden, kernel).compile().as_text()
        print(f"groups{groups}_collectives_in_loops {collectives_in_loops(hlo)}")

    print(f"batch_shards_no_mesh {_batch_shards()}")
    for axes in ({"data": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}):
        with jax.set_mesh(build_mesh(axes, devices=jax.devices()[:DEVICES])):
            print(f"batch_shards_{'_'.join(f'{k}{v}' for k, v in axes.items())} {_batch_shards()}")


if __name__ == "__main__":
    main()
