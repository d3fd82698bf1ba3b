"""Benchmark library: the M2RNN op backends (op.py), a model preset's blocks, head, optimizer and train step
(model.py), shared timing (timing.py) and output (report.py); used by `m2rnn-jax bench` and experiments/."""
