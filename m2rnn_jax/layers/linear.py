"""The projections of every mixer: an ``nnx.Linear`` with normal init and logical sharding axes.

Input projections use ``std = initializer_range``; output projections back into the residual stream use the
depth-scaled ``std = initializer_range / sqrt(2 * num_layers)`` (SPEC §3.3, §9.1): :func:`output_projection_std`.
:func:`linear_columns` computes some of a projection's output columns from the kernel's columns alone, and
:func:`linear_blocks` a projection's consecutive column blocks that way: one parameter (checkpoints and interop
unchanged), separate matmuls for outputs used apart.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.typing import Dtype


def output_projection_std(initializer_range: float, num_layers: int) -> float:
    """σ of a projection that writes into the residual stream: ``initializer_range / sqrt(2 L)``."""
    return initializer_range / math.sqrt(2 * num_layers)


def sharded_linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    std: float,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nnx.Linear`` (in_features -> out_features), kernel ~ N(0, std^2), bias zeros.

    ``axes`` are the logical sharding axes of the kernel (in_features, out_features), e.g. ("embed", "heads"); the
    bias follows the output axis.
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=jax.nn.initializers.normal(stddev=std),
        kernel_metadata={"out_sharding": axes, "eager_sharding": False},
        bias_metadata={"out_sharding": axes[-1:], "eager_sharding": False},
        rngs=rngs,
    )


def linear_columns(linear: nnx.Linear, x: jax.Array, columns: slice) -> jax.Array:
    """``linear(x)[..., columns]`` computed from the kernel's (and bias') ``columns`` only, in ``linear.dtype``.

    Splitting the kernel instead of the product keeps the outputs' gradients apart: the backward of a split of the
    product is a concatenate of every output's gradient, an activation-sized copy (in the GDN layer's backward, of
    rows 2 Nv + Nv dv wide, unaligned: 14 ms of the 400M hybrid's H200 step, experiments/RESULTS.md, session 11),
    where split kernels cost one more matmul into the same dx.
    """
    dtype = linear.dtype
    y = jnp.dot(x.astype(dtype), linear.kernel[...][:, columns].astype(dtype))
    if linear.bias is not None:
        y = y + linear.bias[...][columns].astype(dtype)
    return y


def linear_blocks(linear: nnx.Linear, x: jax.Array, widths: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """``jnp.split(linear(x), ...)`` into consecutive column blocks of ``widths`` (summing to the output width),
    each block from its own columns of the kernel (:func:`linear_columns`)."""
    if sum(widths) != linear.out_features or min(widths) < 1:
        raise ValueError(f"widths: expected positive block widths summing to {linear.out_features}, got {widths}")
    ends = itertools.accumulate(widths)
    return tuple(linear_columns(linear, x, slice(end - width, end)) for width, end in zip(widths, ends))
