"""The projections of every mixer: an ``nnx.Linear`` with normal init and logical sharding axes.

Input projections use ``std = initializer_range``; output projections back into the residual stream use the
depth-scaled ``std = initializer_range / sqrt(2 * num_layers)`` (SPEC §3.3, §9.1): :func:`output_projection_std`.
"""

from __future__ import annotations

import math

import jax
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
