"""Benchmark library: the M2RNN op backends (op.py); used by `m2rnn-jax bench` and the GPU scripts in experiments/."""
