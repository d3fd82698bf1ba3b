"""Benchmark library behind `m2rnn-jax bench` (and the scripts in experiments/): the M2RNN op backends (op.py), a
model preset's parts and train step (model.py), the LM head + loss (loss.py), shared timing (timing.py) and output
(report.py); compile.py and collectives.py serve the ahead-of-time `m2rnn-jax compile`."""
