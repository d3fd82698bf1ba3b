"""Pallas kernels of m2rnn-jax: ``gpu`` (NVIDIA, Triton lowering) and ``tpu`` (Mosaic TPU); plain array functions."""
