"""Training: config, presets, data, optimizer, train/eval steps, checkpoints, metrics and the loop.

Import the pieces from their modules (``m2rnn_jax.train.trainer.Trainer``, ``m2rnn_jax.train.presets``); this
package file stays empty so that importing the presets (as ``m2rnn-jax info`` does) stays cheap.
"""
