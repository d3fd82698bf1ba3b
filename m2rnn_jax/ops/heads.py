"""Head broadcasting (SPEC §0.3 / §2.4) as the ops use it; defined once in :mod:`pallas_kernels.heads` (the
kernels' wrappers need it too and import nothing of this package)."""

from pallas_kernels.heads import expand_heads, reduce_heads

__all__ = ["expand_heads", "reduce_heads"]
