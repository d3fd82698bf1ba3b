"""The train step's optimizer update: the library's fused AdamW (``build_optimizer``: one pass per parameter) beside
optax's composition with its NaN guard (``reference_optimizer``: global-norm clipping, masked weight decay,
``optax.apply_if_finite``, a ``lax.cond`` around the whole update), the composition with a select-based guard and
with no guard, on a preset's parameters, donated, timed side by side.

    PYTHONPATH=. python3 experiments/bench/optimizer_check.py [--model hybrid-gdn-m2rnn-1l-400m]

On the CPU box (2026-12-04, one core, the 1L hybrid's 510M float32 parameters) the fused update took 3333 ms and
optax's 3545 ms (the last two variants need more than the box's 24 GiB at this size); earlier, on 24 x (1024, 2048)
parameters, the select guard was 1.7x slower than the conditional (1716 vs 1024 ms; no guard 732 ms).
"fused, one flat leaf" runs the fused update on the same elements raveled into one array: the floor without the
per-leaf kernels. On the H200 (2026-12-04, 509.6M parameters in 253 leaves) the four tree variants took 11.3-15.9 ms,
~4x the update's bandwidth floor (3.3 ms); on this box (tiny-m2rnn, 45 leaves, both cores shared with other jobs)
the fused update took 6.26 ms on the tree and 0.91 ms on one flat leaf.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from m2rnn_jax.bench.model import SCHEDULE_STEPS, random_like, resolve_config
from m2rnn_jax.bench.timing import median_ms
from m2rnn_jax.models.counting import abstract_decoder
from m2rnn_jax.testing import relative_error
from m2rnn_jax.train.config import OptimizerConfig
from m2rnn_jax.train.optimizer import MAX_SKIPPED_IN_A_ROW, build_optimizer, clipped_adamw, reference_optimizer
from m2rnn_jax.train.state import _split_params


def select_guard(inner: optax.GradientTransformation, max_consecutive_errors: int) -> optax.GradientTransformation:
    """``optax.apply_if_finite``'s state and results, with a select instead of the conditional."""

    def init(params: Any) -> optax.ApplyIfFiniteState:
        counts = (jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))  # two buffers: the state is donated
        return optax.ApplyIfFiniteState(counts[0], jnp.array(True), counts[1], inner.init(params))

    def update(updates: Any, state: optax.ApplyIfFiniteState, params: Any = None):
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(updates)]))
        notfinite_count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
        accept = jnp.logical_or(finite, notfinite_count > max_consecutive_errors)
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        kept_updates = jax.tree.map(lambda new: jnp.where(accept, new, 0), new_updates)
        kept_inner = jax.tree.map(lambda new, old: jnp.where(accept, new, old), new_inner, state.inner_state)
        total = jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite))
        return kept_updates, optax.ApplyIfFiniteState(notfinite_count, finite, total, kept_inner)

    return optax.GradientTransformation(init, update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hybrid-gdn-m2rnn-1l-400m")
    args = parser.parse_args()
    params = random_like(jax.random.PRNGKey(0), _split_params(abstract_decoder(resolve_config(args.model)))[1])
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    config = OptimizerConfig()
    # (optimizer, parameters, gradients); the last: the same elements as ONE leaf, the floor of the update without
    # the per-leaf kernels (its weight decay covers every element, so it is not compared with the others)
    flat = {"flat": jax.flatten_util.ravel_pytree(params)[0]}
    variants = {
        "optax.apply_if_finite (reference)": (reference_optimizer(config, SCHEDULE_STEPS), params, grads),
        "fused (library)": (build_optimizer(config, SCHEDULE_STEPS), params, grads),
        "select guard": (select_guard(clipped_adamw(config, SCHEDULE_STEPS), MAX_SKIPPED_IN_A_ROW), params, grads),
        "no guard": (clipped_adamw(config, SCHEDULE_STEPS), params, grads),
        "fused, one flat leaf": (build_optimizer(config, SCHEDULE_STEPS), flat, jax.tree.map(lambda p: 1e-3 * p, flat)),
    }
    leaves = jax.tree.leaves(params)
    count = sum(p.size for p in leaves)
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.model}: {count:,} float32 parameters "
        f"in {len(leaves)} leaves"
    )
    reference = None
    for name, (optimizer, start, gradients) in variants.items():

        def step(carry, grads, optimizer=optimizer):
            params, state = carry
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        update = jax.jit(step, donate_argnums=0)
        carry = [(jax.tree.map(jnp.copy, start), optimizer.init(start))]
        carry[0] = update(carry[0], gradients)
        first = jax.tree.map(jnp.copy, carry[0][0])  # the carry is donated by the next call
        reference = first if reference is None else reference
        if jax.tree.structure(first) == jax.tree.structure(reference):
            pairs = zip(jax.tree.leaves(first), jax.tree.leaves(reference), strict=True)
            error_text = f"{max(relative_error(a, b) for a, b in pairs):.1e}"
        else:
            error_text = "- (one leaf)"

        def call(update=update, carry=carry, gradients=gradients):
            carry[0] = update(carry[0], gradients)
            return carry[0]

        print(
            f"{name:34s} {median_ms(call):8.3f} ms per update   parameters after one update vs the first: {error_text}"
        )


if __name__ == "__main__":
    main()
