"""Routing a mixture of experts' (token, expert) pairs to the experts: on one device, or expert-parallel.

:func:`run_experts_local` is the single-device program: the T*k pairs are sorted by expert and each expert's rows
go through ``experts_fn`` as one group of a grouped matmul. Under a mesh with an ``expert`` axis of size G > 1 that
program would hold the routed rows of the *global* batch on every chip (XLA cannot partition the sort and the
grouped matmul along the tokens), so :func:`run_experts_all_to_all` runs it inside ``jax.shard_map``:

1. every shard routes its own tokens (B and S stay split over the batch and context axes) and sorts its pairs by
   expert, i.e. by the expert shard that holds the expert (expert shard d holds experts [d E/G, (d+1) E/G));
2. the rows go to their expert shard with one ``all_to_all`` over ``expert``: a fixed-size buffer (G, C, h), C = the
   shard's R = T_local k pairs, so that no row is ever dropped even if every row goes to one shard (dropless, the
   reference semantics); the sizes travel with one ``all_gather`` of the (E,) expert counts;
3. each shard sorts what it received by its local expert, runs its E/G experts (grouped matmul over the rows of
   the groups; the unused buffer rows are outside every group), restores the buffer order and sends the results
   back with the reverse ``all_to_all``;
4. every pair gets its result back and is combined with its router weight on the shard that owns the token.

Only the expert axis communicates; tokens of the data / fsdp / context axes stay on their shard. Axes that split
neither tokens nor experts (``tensor``) see the same tokens and do the same work. The expert weights enter split
over ``expert`` only (gathered over the other axes, as FSDP gathers every weight for its layer), and their
gradient is summed over the token shards by ``shard_map``'s transpose.

Why a fixed-size buffer and not ``jax.lax.ragged_all_to_all`` (which sends only the R rows): XLA:CPU does not
implement ``ragged-all-to-all`` (``UNIMPLEMENTED ... not supported by XLA:CPU``), so it could not be tested here;
the fixed buffer costs G times the bytes of the ragged exchange (docs/tpu_pods.md has the measured memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m2rnn_jax.parallel.axes import auto_axis_sizes, batch_split_axes, spec_entry

EXPERT_AXIS = "expert"
CONTEXT_AXIS = "context"
DISPATCH_CHOICES: tuple[str, ...] = ("auto", "local", "all_to_all")

# experts_fn(rows (R, h), group_sizes (E,) int32, row_experts (R,) int32, params) -> (R, h): rows sorted by expert,
# group_sizes rows per expert (rows past their sum belong to no group), params a pytree of (E, ...) arrays.
ExpertsFn = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


def mesh_is_split() -> bool:
    """Whether the current mesh has an axis of size > 1 that is not manual yet (work there is partitioned)."""
    return any(size > 1 for size in auto_axis_sizes().values())


def expert_axis_size() -> int:
    """Size of the current mesh's ``expert`` axis (1 without a mesh or inside a shard_map that made it manual)."""
    return auto_axis_sizes().get(EXPERT_AXIS, 1)


def resolve_dispatch(dispatch: str, num_experts: int, batch: int) -> str:
    """``"local"`` or ``"all_to_all"`` for ``dispatch`` under the current mesh and a batch of ``batch`` sequences.

    ``"auto"``: all_to_all when the mesh has an expert axis > 1 and ``batch`` splits over the batch axes, otherwise
    local. ``"all_to_all"`` with an expert axis of size 1 is local (there is nothing to exchange). ValueError when
    the expert axis does not divide ``num_experts``, or (``"all_to_all"``) the batch does not split.
    """
    if dispatch not in DISPATCH_CHOICES:
        raise ValueError(f"dispatch: expected one of {DISPATCH_CHOICES}, got {dispatch!r}")
    shards = expert_axis_size()
    if dispatch == "local" or shards == 1:
        return "local"
    if num_experts % shards != 0:
        raise ValueError(
            f"num_experts: expected a multiple of the expert axis size {shards} (mesh axis {EXPERT_AXIS!r}), "
            f"got {num_experts}"
        )
    if EXPERT_AXIS in batch_split_axes(auto_axis_sizes(), batch):
        return "all_to_all"
    if dispatch == "all_to_all":
        sizes = auto_axis_sizes()
        raise ValueError(
            f"batch: expected a multiple of the batch shards {sizes} (axes data*fsdp*expert) for dispatch "
            f"'all_to_all', got {batch}"
        )
    return "local"


def inverse_permutation(order: jax.Array) -> jax.Array:
    """order (N,) a permutation -> (N,) its inverse (``x[order][inverse] == x``)."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def combine(weights: jax.Array, pair_outputs: jax.Array, dtype: Any) -> jax.Array:
    """weights (T, k), pair_outputs (T k, h) in pair order t k + j -> (T, h) sum_j weights * output, in
    ``promote_types(float32, dtype)``."""
    num_tokens, top_k = weights.shape
    compute = jnp.promote_types(jnp.float32, dtype)
    outputs = pair_outputs.reshape(num_tokens, top_k, -1).astype(compute)
    return jnp.einsum("tk,tkh->th", weights.astype(compute), outputs)


def run_experts_local(
    experts_fn: ExpertsFn, tokens: jax.Array, weights: jax.Array, experts: jax.Array, params: Any, num_experts: int
) -> jax.Array:
    """tokens (T, h), weights (T, k), experts (T, k) int32 -> (T, h) ``sum_k weights * expert_k(token)`` on one
    device (or left to XLA's partitioner), in ``promote_types(float32, tokens.dtype)``."""
    top_k = experts.shape[1]
    flat_experts = experts.reshape(-1)  # (T k,) pair p = token p // k, choice p % k
    order = jnp.argsort(flat_experts, stable=True)  # pairs grouped by expert
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    out = experts_fn(tokens[order // top_k], group_sizes, flat_experts[order], params)
    return combine(weights, out[inverse_permutation(order)], tokens.dtype)


def _exchange_local(
    experts_fn: ExpertsFn, tokens: jax.Array, weights: jax.Array, experts: jax.Array, params: Any, num_experts: int
) -> jax.Array:
    """One shard's part of the expert-parallel program (inside shard_map; see the module doc for the steps).

    tokens (T, h), weights (T, k), experts (T, k) of this shard; params the (E/G, ...) local expert slices.
    """
    shards = jax.lax.axis_size(EXPERT_AXIS)
    local_experts = num_experts // shards
    top_k = experts.shape[1]
    pairs = experts.size
    capacity = pairs  # rows per destination: dropless even if every pair goes to one shard
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    counts = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # (E,)
    send_sizes = counts.reshape(shards, local_experts).sum(axis=1)  # (G,)
    starts = jnp.cumsum(send_sizes) - send_sizes  # (G,) first sorted position per destination
    slot = jnp.arange(capacity, dtype=jnp.int32)

    # Send buffer (G, C, h): slot i of destination d holds sorted pair starts[d] + i (if i < send_sizes[d]).
    source = jnp.minimum(starts[:, None] + slot[None, :], pairs - 1)
    used = slot[None, :] < send_sizes[:, None]
    send = jnp.where(used[..., None], tokens[order[source] // top_k], 0)
    received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # [s]: what shard s sent here

    # What shard s sent here is sorted by expert: counts_here[s, j] rows of local expert j, then unused slots.
    all_counts = jax.lax.all_gather(counts, EXPERT_AXIS)  # (G, E)
    first = jax.lax.axis_index(EXPERT_AXIS) * local_experts
    counts_here = jax.lax.dynamic_slice_in_dim(all_counts, first, local_experts, axis=1)  # (G, E/G)
    ends = jnp.cumsum(counts_here, axis=1)
    row_expert = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1).reshape(-1)  # (G C,), E/G = unused
    received_order = jnp.argsort(row_expert, stable=True)
    group_sizes = counts_here.sum(axis=0)  # (E/G,)
    rows = received.reshape(shards * capacity, -1)[received_order]
    row_experts = jnp.minimum(row_expert[received_order], local_experts - 1)
    out = experts_fn(rows, group_sizes, row_experts, params)
    out = out[inverse_permutation(received_order)].reshape(shards, capacity, -1)
    returned = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True)  # [d]: results of what was sent to d

    # Pair q sits at sorted position p; it went to destination d = its expert's shard, slot p - starts[d].
    destination = flat_experts // local_experts
    position = inverse_permutation(order)
    pair_outputs = returned.reshape(shards * capacity, -1)[destination * capacity + position - starts[destination]]
    return combine(weights, pair_outputs, tokens.dtype)


def run_experts_all_to_all(
    experts_fn: ExpertsFn, x: jax.Array, weights: jax.Array, experts: jax.Array, params: Any, num_experts: int
) -> jax.Array:
    """x (B, S, h), weights (B, S, k), experts (B, S, k) int32, params pytree of (E, ...) arrays -> (B, S, h) in
    ``promote_types(float32, x.dtype)``: the expert-parallel program (module doc) under the current mesh.

    Requires (see :func:`resolve_dispatch`) an expert axis that divides ``num_experts`` and a batch that splits over
    the batch axes; a context axis > 1 must divide S.
    """
    batch, seq_len, hidden = x.shape
    sizes = auto_axis_sizes()
    batch_axes = batch_split_axes(sizes, batch)
    context = sizes.get(CONTEXT_AXIS, 1)
    if seq_len % context != 0:
        raise ValueError(
            f"sequence length: expected a multiple of the context axis size {context} (mesh axis "
            f"{CONTEXT_AXIS!r}), got {seq_len}"
        )
    seq_axis = CONTEXT_AXIS if context > 1 else None
    manual = set(sizes)  # every axis not manual yet, so that Pallas (Mosaic) expert kernels may run inside
    token_spec = P(spec_entry(batch_axes), seq_axis)
    param_specs = jax.tree.map(lambda a: P(EXPERT_AXIS, *([None] * (a.ndim - 1))), params)
    out_dtype = jnp.promote_types(jnp.float32, x.dtype)
    dtypes = jax.tree.map(lambda a: a.dtype, (x, params))
    # 16-bit floats cross the shard_map boundary as float32: the transpose sums the cotangents of arguments
    # replicated over an axis (tensor) in their dtype, and XLA:CPU cannot compile a bfloat16 all-reduce there.
    x, params = jax.tree.map(_widen, (x, params))

    def local(x, weights, experts, params):
        x, params = jax.tree.map(lambda a, dtype: a.astype(dtype), (x, params), dtypes)
        b, s, _ = x.shape
        top_k = experts.shape[-1]
        y = _exchange_local(
            experts_fn,
            x.reshape(b * s, hidden),
            weights.reshape(b * s, top_k),
            experts.reshape(b * s, top_k),
            params,
            num_experts,
        )
        return y.reshape(b, s, hidden).astype(out_dtype)

    return jax.shard_map(
        local,
        in_specs=(token_spec, token_spec, token_spec, param_specs),
        out_specs=token_spec,
        axis_names=manual,
        check_vma=False,
    )(x, weights, experts, params)


def _widen(x: jax.Array) -> jax.Array:
    """float32 for a 16-bit float array, ``x`` otherwise."""
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32 else x
