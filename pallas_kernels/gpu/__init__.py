"""M2RNN kernels for NVIDIA GPUs (Pallas, Triton lowering): plain array functions, no Flax.

``m2rnn_forward`` / ``m2rnn_backward`` work on packed, padded inputs; ``m2rnn_jax.ops.pallas_gpu`` wires them into
the op. ``KernelConfig`` holds the launch parameters.
"""

from pallas_kernels.gpu.m2rnn_backward import m2rnn_backward
from pallas_kernels.gpu.m2rnn_common import KernelConfig
from pallas_kernels.gpu.m2rnn_forward import m2rnn_forward

__all__ = ["KernelConfig", "m2rnn_backward", "m2rnn_forward"]
