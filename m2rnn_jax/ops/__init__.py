"""The recurrences as ops, one package each (reference, backends, validation): :func:`m2rnn`
(:mod:`m2rnn_jax.ops.m2rnn.op` holds the contract), :func:`gated_delta_rule` and :func:`ssd` (Mamba2's).

The names ``m2rnn``, ``gated_delta_rule`` and ``ssd`` here are the op functions; each shadows the attribute of its
package of the same name, so reach a package's modules with ``from m2rnn_jax.ops.m2rnn import backends`` or
``from m2rnn_jax.ops.m2rnn.pallas_gpu import ...`` (``import m2rnn_jax.ops.m2rnn.pallas_gpu as x`` does not work).
Shared by the ops: head repeat/sum (:mod:`m2rnn_jax.ops.heads`) and the clamped cotangent
(:mod:`m2rnn_jax.ops.clipping`).
"""

from m2rnn_jax.ops.clipping import clamp_cotangent
from m2rnn_jax.ops.gated_delta_rule import gated_delta_rule
from m2rnn_jax.ops.m2rnn import m2rnn
from m2rnn_jax.ops.m2rnn.backends import available_backends, register_backend, resolve_backend_name
from m2rnn_jax.ops.ssd import ssd

__all__ = [
    "available_backends",
    "clamp_cotangent",
    "gated_delta_rule",
    "m2rnn",
    "register_backend",
    "resolve_backend_name",
    "ssd",
]
