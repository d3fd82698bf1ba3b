"""Inputs of a ``jax.custom_vjp`` made to vary over the same manual mesh axes (``jax.shard_map``, check_vma).

Inside ``jax.shard_map(..., check_vma=True)`` the type of every value records the manual mesh axes it varies over.
A custom VJP's backward must return each cotangent with the type of its primal input, but the gradient of a
replicated parameter computed from activations that vary is itself varying. Casting the inputs to the union of
their varying axes *before* the custom VJP (``jax.lax.pcast(..., to="varying")``) makes the types agree, and
autodiff of that cast sums the cotangent over the added axes, as a replicated parameter's gradient needs. Outside
a ``shard_map`` nothing varies and the values pass through unchanged.
"""

from __future__ import annotations

import jax


def varying_axes(x: jax.Array) -> frozenset[str]:
    """The manual mesh axes over which ``x`` varies (empty outside ``jax.shard_map``)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.8; earlier releases name the set ``vma``
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def vary_together(*values: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """``values`` with each cast to vary over the union of their varying axes (None entries stay None)."""
    union = frozenset().union(*(varying_axes(v) for v in values if v is not None))
    cast = []
    for value in values:
        missing = frozenset() if value is None else union - varying_axes(value)
        cast.append(jax.lax.pcast(value, tuple(sorted(missing)), to="varying") if missing else value)
    return tuple(cast)
