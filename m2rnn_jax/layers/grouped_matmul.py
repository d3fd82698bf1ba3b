"""Grouped matmul of the MoE experts: rows sorted by group times one (in, out) matrix per group.

Two implementations with the same result:

* ``"ragged_dot"``: ``jax.lax.ragged_dot``. On TPU its gradient with respect to the weights (a ragged
  *contraction*) is expanded by libtpu into a dense (groups, rows, in) masked copy of the rows: with 16 local
  experts and 262,144 buffer rows of width 1536 that is 12 GiB per weight gradient (the 7B preset, 1 sequence per
  v5p chip; experiments/RESULTS.md, "Session 7").
* ``"megablox"``: the Pallas TPU grouped matmul kernels that ship with JAX
  (``jax.experimental.pallas.ops.tpu.megablox``: ``gmm`` forward and input gradient, ``tgmm`` weight gradient),
  which visit only the row tiles of each group. Rows are padded to a multiple of the row tile (128).

The megablox kernels need matrix widths (in, out) that are multiples of 128 (their tiles are used both ways
round in the backward pass); the 7B experts' 1536 and 256 are. ``"auto"`` picks megablox when the default backend is
a TPU and the widths allow it, ragged_dot otherwise; ``m2rnn-jax compile`` asks for megablox where the widths allow
it (it compiles for a TPU from a CPU host). Rows past the sum of the group sizes belong to no group: their
output and input gradient are zero with both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2rnn_jax.typing import Dtype

GROUPED_MATMUL_CHOICES: tuple[str, ...] = ("auto", "ragged_dot", "megablox")
ROW_TILE = 128


def megablox_fits(*widths: int) -> bool:
    """Whether the megablox kernels take matrices of these widths (multiples of 128)."""
    return all(width % ROW_TILE == 0 for width in widths)


def resolve_grouped_matmul(choice: str, *widths: int) -> str:
    """``"ragged_dot"`` or ``"megablox"`` for ``choice`` and matrices of ``widths`` (``"auto"``: megablox on a TPU
    default backend when :func:`megablox_fits` the widths)."""
    if choice not in GROUPED_MATMUL_CHOICES:
        raise ValueError(f"grouped_matmul: expected one of {GROUPED_MATMUL_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "megablox" if jax.default_backend() == "tpu" and megablox_fits(*widths) else "ragged_dot"
    return choice


def grouped_matmul(
    x: jax.Array,
    kernel: jax.Array,
    group_sizes: jax.Array,
    dtype: Dtype,
    implementation: str,
    *,
    interpret: bool = False,
) -> jax.Array:
    """x (R, in) rows sorted by group, kernel (G, in, out), group_sizes (G,) int32 -> (R, out) in ``dtype``.

    implementation: ``"ragged_dot"`` or ``"megablox"`` (see the module doc); ``interpret`` runs the megablox
    kernels in Pallas interpret mode (tests on CPU; any widths), compiled they need ``megablox_fits(in, out)``.
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(x, kernel, group_sizes)
    if implementation != "megablox":
        raise ValueError(f"implementation: expected 'ragged_dot' or 'megablox', got {implementation!r}")
    if not interpret and not megablox_fits(*kernel.shape[1:]):
        raise ValueError(
            f"kernel: expected widths (in, out) that are multiples of {ROW_TILE} for 'megablox', got "
            f"{kernel.shape[1:]}; use grouped_matmul='ragged_dot'"
        )
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    rows = x.shape[0]
    # Rows in no group: zero in, zero out (the kernels leave their output and input gradient unwritten).
    in_group = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]
    padded = -(-rows // ROW_TILE) * ROW_TILE
    x = jnp.pad(jnp.where(in_group, x, 0), ((0, padded - rows), (0, 0)))
    tiling = (ROW_TILE, min(ROW_TILE, kernel.shape[1]), min(ROW_TILE, kernel.shape[2]))
    y = megablox.gmm(x, kernel, group_sizes.astype(jnp.int32), jnp.dtype(dtype), tiling, interpret=interpret)
    return jnp.where(in_group, y[:rows], 0)
