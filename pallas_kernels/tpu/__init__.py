"""Fused M2RNN kernels for TPUs (Mosaic TPU through Pallas): plain array functions, no Flax.

``m2rnn_tpu_forward`` / ``m2rnn_tpu_backward`` take inputs already broadcast to N heads (dense (B, S, N, ...) or
varlen (T, N, ...) with ``cu_seqlens``); ``m2rnn_jax.ops.pallas_tpu`` wraps them in a ``jax.custom_vjp``. The
kernel layout, block sizes and VMEM budget are described in ``layout.py`` and ``docs/tpu.md``.
"""

from pallas_kernels.tpu.backward import m2rnn_tpu_backward
from pallas_kernels.tpu.forward import m2rnn_tpu_forward
from pallas_kernels.tpu.layout import BlockPlan, plan_blocks

__all__ = ["m2rnn_tpu_forward", "m2rnn_tpu_backward", "BlockPlan", "plan_blocks"]
