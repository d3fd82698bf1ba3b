"""The M2RNN op and its backends (see :func:`m2rnn_jax.ops.op.m2rnn` for the contract)."""

from m2rnn_jax.ops.backends import available_backends, register_backend, resolve_backend_name
from m2rnn_jax.ops.clipping import clamp_cotangent
from m2rnn_jax.ops.gdn import gated_delta_rule  # noqa: F401  (the gated delta rule op)
from m2rnn_jax.ops.op import m2rnn

__all__ = ["m2rnn", "register_backend", "resolve_backend_name", "available_backends", "clamp_cotangent"]
