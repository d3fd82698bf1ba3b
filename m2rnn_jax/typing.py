"""Type aliases shared by the package."""

from __future__ import annotations

from typing import Any

# A dtype as the layers take it: a jnp/numpy dtype, a scalar type such as jnp.bfloat16, or its name.
Dtype = Any

# The ``interpret`` argument of the ops' Pallas backends: False (compile for the device), True (Pallas interpret
# mode, on CPU), or a ``jax.experimental.pallas.tpu.InterpretParams`` (the pallas_tpu backend only).
Interpret = bool | Any
