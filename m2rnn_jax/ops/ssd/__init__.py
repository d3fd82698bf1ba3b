"""SSD (Mamba2's state-space recurrence) as an op: chunked form for training, step-by-step form for decoding.

See :func:`ssd` for the contract.
"""

from m2rnn_jax.ops.ssd.chunked import ssd_chunked
from m2rnn_jax.ops.ssd.op import ssd
from m2rnn_jax.ops.ssd.reference import ssd_recurrent

__all__ = ["ssd", "ssd_chunked", "ssd_recurrent"]
