"""Type aliases shared by the package."""

from __future__ import annotations

from typing import Any

# A dtype as the layers take it: a jnp/numpy dtype, a scalar type such as jnp.bfloat16, or its name.
Dtype = Any
