"""m2rnn-jax: M2RNN (Matrix-to-Matrix RNN, arXiv 2603.14360) in JAX/Flax.

``m2rnn_jax.m2rnn`` is the op (reference ``lax.scan`` and fused Pallas backends); ``m2rnn_jax.layers.M2RNN`` is the
full layer as a Flax NNX module; ``m2rnn_jax.interop.torch_reference`` is an independent PyTorch implementation
for parity checks.
"""

from m2rnn_jax.ops import m2rnn

__all__ = ["m2rnn"]
__version__ = "0.1.0"
