"""Running an M2RNN backend under a device mesh: ``jax.shard_map`` over (batch, heads).

A Pallas kernel is an opaque custom call that XLA cannot partition, so under a mesh the op runs its backend inside
``jax.shard_map``: the batch dimension is split over :data:`BATCH_MESH_AXES`, the heads over
:data:`HEAD_MESH_AXIS`, and each device runs the whole recurrence of its (sequences, heads) block with no
communication. Inputs with fewer heads than head shards are handled per count N_x:

* N_x divisible by the head shards: split like the output heads (each shard keeps the ratio N / N_x);
* N_x == 1 (the paper's shared q and k): replicated, broadcast inside each shard;
* otherwise: expanded to N heads before the split (memory N / N_x times that input).

Axes that are absent or of size 1, a batch not divisible by its shards, or N not divisible by the head shards
turn the corresponding split off; with nothing to split the backend is called directly. Varlen (packed) inputs
are split over heads only. The mesh is the one set by ``jax.set_mesh`` (the trainer sets it); axes that are
already manual (the op called inside a caller's ``shard_map``) are left alone, so the caller's split stands and
only the remaining auto axes are split here. :func:`m2rnn_jax.m2rnn` routes its Pallas backends through here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m2rnn_jax.ops.heads import expand_heads
from m2rnn_jax.ops.m2rnn.validation import M2RNNShapes, resolve_shapes
from m2rnn_jax.parallel.axes import HEAD_MESH_AXIS, auto_axis_sizes, batch_split_axes, spec_entry
from m2rnn_jax.typing import Interpret


def run_sharded(
    backend: Callable[..., tuple[jax.Array, jax.Array]],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    W: jax.Array,
    f: jax.Array,
    h0: jax.Array | None,
    *,
    cu_seqlens: jax.Array | None,
    gradient_clipping: float | None,
    state_dtype: jnp.dtype,
    interpret: Interpret,
    shapes: M2RNNShapes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``backend(q, k, v, W, f, h0, ...)`` run per (batch, head) block of the current mesh (see module doc).

    Same arguments and results as a backend (validated inputs, original head counts, ``shapes`` as
    ``validate_inputs`` returned them or None): dense q (B,S,Nq,K), k (B,S,Nk,K), v (B,S,Nv,V), f (B,S,Nf),
    W (Nw,V,V), h0 (B,N,K,V) or None -> y (B,S,N,V), h_final (B,N,K,V); varlen the same with (T, ...) inputs and
    cu_seqlens (B+1,). Each block's backend gets the sizes of its block.
    """
    kwargs = dict(gradient_clipping=gradient_clipping, state_dtype=state_dtype, interpret=interpret)
    shapes = resolve_shapes(shapes, q, k, v, W, f, h0, cu_seqlens)
    sizes = auto_axis_sizes()
    varlen = shapes.varlen
    num_heads = shapes.num_heads

    batch_axes = () if varlen else batch_split_axes(sizes, shapes.batch)
    head_shards = sizes.get(HEAD_MESH_AXIS, 1)
    head_axis = HEAD_MESH_AXIS if head_shards > 1 and num_heads % head_shards == 0 else None
    if not batch_axes and head_axis is None:
        return backend(q, k, v, W, f, h0, cu_seqlens=cu_seqlens, shapes=shapes, **kwargs)

    b = spec_entry(batch_axes)
    token_axes = (None,) if varlen else (b, None)  # dense: (B, S); varlen: (T,) never split

    def split_heads(x: jax.Array, count: int, head_dim: int) -> tuple[jax.Array, str | None, int]:
        """x, the mesh axis of its heads and its head count per shard."""
        if head_axis is None:
            return x, None, count
        if count % head_shards == 0:
            return x, head_axis, count // head_shards
        if count == 1:
            return x, None, 1
        return expand_heads(x, num_heads, axis=head_dim), head_axis, num_heads // head_shards

    q, hq, local_q = split_heads(q, shapes.num_q_heads, -2)
    k, hk, local_k = split_heads(k, shapes.num_k_heads, -2)
    v, hv, local_v = split_heads(v, shapes.num_v_heads, -2)
    f, hf, local_f = split_heads(f, shapes.num_f_heads, -1)
    W, hw, local_w = split_heads(W, shapes.num_w_heads, 0)
    local_shapes = dataclasses.replace(
        shapes,
        batch=shapes.batch // math.prod(sizes[axis] for axis in batch_axes),
        num_heads=num_heads // head_shards if head_axis else num_heads,
        num_q_heads=local_q,
        num_k_heads=local_k,
        num_v_heads=local_v,
        num_f_heads=local_f,
        num_w_heads=local_w,
    )
    args = [q, k, v, W, f]
    specs = [
        P(*token_axes, hq, None),
        P(*token_axes, hk, None),
        P(*token_axes, hv, None),
        P(hw, None, None),
        P(*token_axes, hf),
    ]
    state_spec = P(b, head_axis, None, None)
    if h0 is not None:
        args.append(h0)
        specs.append(state_spec)
    if varlen:
        args.append(cu_seqlens)
        specs.append(P())
    has_h0 = h0 is not None

    # Mesh axes that split neither the batch nor the heads: every block runs on each of their devices, and with
    # check_vma=False shard_map's transpose hands each copy 1/replicas of the outputs' cotangent (and sums the
    # inputs' cotangents over the copies). That is exact for a linear backward but not for the clamp of SPEC §0.1,
    # which must see the whole cotangent: scale it back up at the outputs and down at the inputs.
    replicas = math.prod(size for axis, size in sizes.items() if axis not in batch_axes and axis != head_axis)
    rescale = gradient_clipping is not None and replicas > 1

    def local(q, k, v, W, f, *rest):
        rest = list(rest)
        local_h0 = rest.pop(0) if has_h0 else None
        local_cu = rest.pop(0) if varlen else None
        if rescale:
            q, k, v, W, f, local_h0 = (
                None if x is None else _scale_cotangent(1.0 / replicas, x) for x in (q, k, v, W, f, local_h0)
            )
        outputs = backend(q, k, v, W, f, local_h0, cu_seqlens=local_cu, shapes=local_shapes, **kwargs)
        return tuple(_scale_cotangent(float(replicas), x) for x in outputs) if rescale else outputs

    out_specs = (P(*token_axes, head_axis, None), state_spec)
    return jax.shard_map(local, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scale_cotangent(factor: float, x: jax.Array) -> jax.Array:
    """The identity, whose backward multiplies the cotangent by ``factor``."""
    return x


def _scale_cotangent_forward(factor: float, x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _scale_cotangent_backward(factor: float, _: None, cotangent: jax.Array) -> tuple[jax.Array]:
    return (cotangent * jnp.asarray(factor, cotangent.dtype),)


_scale_cotangent.defvjp(_scale_cotangent_forward, _scale_cotangent_backward)
