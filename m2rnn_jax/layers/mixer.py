"""The interface every sequence mixer implements (M2RNN, Gated DeltaNet, Mamba2, attention, RNN, GRU).

The decoder builds and calls mixers only through this interface, so a new mixer needs no change to the decoder:
register it in :mod:`m2rnn_jax.models.mixers`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from m2rnn_jax.typing import Dtype


@runtime_checkable
class SequenceMixer(Protocol):
    """A token mixer of one decoder block: x (B, S, h) -> (y (B, S, h), state).

    Constructor (called by the decoder with keywords)::

        Mixer(hidden_size, config, *, num_layers, initializer_range, dtype, param_dtype, rngs)

    ``num_layers`` is the model depth (depth-scaled init of the output projection).
    """

    def init_state(self, batch_size: int, max_length: int, dtype: Dtype = ...) -> Any:
        """The empty decoding state (zeros; an attention cache of ``max_length`` slots)."""
        ...

    def __call__(
        self, x: jax.Array, state: Any = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, Any]:
        """x (B, S, h) -> (y (B, S, h), new state); ``state=None`` starts from :meth:`init_state`'s zeros.

        ``segment_ids`` (B, S) document ids or None: a new document starts where the id changes between
        neighbouring positions, from a zero state (attention: it attends within its document only).
        """
        ...
