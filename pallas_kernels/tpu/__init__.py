"""Fused M2RNN kernels for TPUs (Mosaic TPU through Pallas): plain array functions, no Flax.

``m2rnn_forward.m2rnn_forward`` / ``m2rnn_backward.m2rnn_backward`` take inputs already broadcast to N heads (dense
(B, S, N, ...) or varlen (T, N, ...) with ``cu_seqlens``); ``m2rnn_jax.ops.m2rnn.pallas_tpu`` wraps them in a
``jax.custom_vjp``. The kernel layout, block sizes and VMEM budget are described in ``m2rnn_layout.py`` and
``docs/tpu.md``. Import from the modules: this package re-exports nothing, so that no function hides the module of
the same name.
"""
