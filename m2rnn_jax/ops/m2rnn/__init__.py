"""The M2RNN op and its backends; see :func:`m2rnn_jax.ops.m2rnn.op.m2rnn` for the contract.

Modules: ``op`` (validation, backend dispatch, output dtypes), ``validation``, ``backends`` (the registry and
"auto"), ``reference`` (``lax.scan``, the ground truth), ``scan_backend``, ``pallas_gpu`` and ``pallas_tpu`` (the
fused kernels of :mod:`pallas_kernels`), ``sharding`` (the kernels under a mesh).
"""

from m2rnn_jax.ops.m2rnn.op import m2rnn

__all__ = ["m2rnn"]
