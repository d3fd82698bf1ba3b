"""The gated delta rule op (Gated DeltaNet's recurrence) and its backends; see :func:`gated_delta_rule`."""

from m2rnn_jax.ops.gated_delta_rule.chunked import gated_delta_rule_chunked
from m2rnn_jax.ops.gated_delta_rule.op import gated_delta_rule
from m2rnn_jax.ops.gated_delta_rule.recurrent import gated_delta_rule_recurrent

__all__ = ["gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_recurrent"]
