"""Context parallelism: the sequence dimension split into contiguous shards over the ``context`` mesh axis.

Set ``mesh.context = P`` (training config) or build a mesh with a ``context`` axis and ``jax.set_mesh`` it: batches
are split over the axis along the sequence (:func:`m2rnn_jax.parallel.shardings.batch_sharding`), and every layer
that mixes along time asks :func:`context_axis_size` and, above 1, runs its mixing across the shards: the
non-linear recurrences (M2RNN, RNN, GRU) through the pipeline of :mod:`.pipeline`, the M2RNN op through
:func:`context_m2rnn`. See ``docs/context_parallelism.md``.
"""

from m2rnn_jax.parallel.context.axis import CONTEXT_AXIS, context_axis_size, require_supported
from m2rnn_jax.parallel.context.m2rnn import context_m2rnn
from m2rnn_jax.parallel.context.pipeline import (
    choose_micro_batches,
    context_recurrence,
    idle_fraction,
    pipelined_recurrence,
)

__all__ = [
    "CONTEXT_AXIS",
    "choose_micro_batches",
    "context_axis_size",
    "context_m2rnn",
    "context_recurrence",
    "idle_fraction",
    "pipelined_recurrence",
    "require_supported",
]
