"""Kernels for NVIDIA GPUs: plain array functions, no Flax. One module per op and part, named ``<op>_<part>``.

``m2rnn_forward`` / ``m2rnn_backward`` (Pallas, Triton lowering) and ``m2rnn_forward_gluon`` /
``m2rnn_backward_gluon`` (Gluon) work on packed, padded inputs; ``m2rnn_common.KernelConfig`` holds the launch
parameters and ``m2rnn_jax.ops.m2rnn.pallas_gpu`` wires them into the op. ``gdn_chunk_states`` is the gated delta
rule's walk over chunks (``m2rnn_jax.ops.gated_delta_rule.pallas_gpu``). Import from the modules: this package
re-exports nothing, so that no function hides the module of the same name.
"""
