"""Accuracy at every position of long evaluation sequences: the accuracy-vs-length curve from one forward pass.

Every model in the comparison is causal, so the prediction at position n of a long sequence is the prediction the
model makes on the length-n prefix alone: one pass over sequences of the longest length gives, for every n,
* the **position accuracy**: the fraction of sequences whose running product after n elements is predicted right
  (the answer a length-n problem asks for), and
* the **sequence accuracy**: the fraction of sequences whose every running product up to n is right.
The evaluation sequences are the same for every model and seed (a fixed stream, disjoint from training data).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from m2rnn_jax.data.sources import EVAL_STREAM
from m2rnn_jax.data.state_tracking import get_group, state_tracking_batch

COMPARE_EVAL_SEED = EVAL_STREAM + 14  # one evaluation stream for every model and seed of the comparison


def evaluation_batch(group: str, length: int, num_sequences: int) -> dict[str, np.ndarray]:
    """The fixed evaluation set: ``{"inputs", "targets"}`` of shape (num_sequences, length) int32."""
    if length < 1 or num_sequences < 1:
        raise ValueError(f"length and num_sequences: expected >= 1, got {length} and {num_sequences}")
    return state_tracking_batch(
        get_group(group), seed=COMPARE_EVAL_SEED, step=0, batch_size=num_sequences, seq_len=length
    )


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    """The argmax token at every position, (B, S) int32 (one compile per model structure and shape: every seed
    of a model reuses it)."""
    return jnp.argmax(nnx.merge(graphdef, params)(tokens).logits, axis=-1).astype(jnp.int32)


def correct_matrix(
    graphdef: nnx.GraphDef, params: nnx.State, inputs: np.ndarray, targets: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Whether the model's argmax equals the target at every position: (B, S) bool, ``chunk`` rows at a time."""
    rows = []
    for start in range(0, inputs.shape[0], chunk):
        predicted = np.asarray(jax.device_get(_predict(graphdef, params, jnp.asarray(inputs[start : start + chunk]))))
        rows.append(predicted == targets[start : start + chunk])
    return np.concatenate(rows, axis=0)


def accuracy_curves(correct: np.ndarray) -> dict[str, list[float]]:
    """(B, S) bool -> ``{"position": [S], "sequence": [S]}``: entry n - 1 is the accuracy at length n."""
    if correct.ndim != 2:
        raise ValueError(f"correct: expected a (sequences, positions) array, got shape {correct.shape}")
    prefix_all = np.logical_and.accumulate(correct, axis=1)
    return {"position": correct.mean(axis=0).tolist(), "sequence": prefix_all.mean(axis=0).tolist()}


def at_lengths(curves: dict[str, list[float]], lengths: list[int]) -> dict[str, dict[str, float]]:
    """The curves read at ``lengths``: ``{str(n): {"position": ..., "sequence": ...}}``."""
    longest = len(curves["position"])
    if any(n < 1 or n > longest for n in lengths):
        raise ValueError(f"lengths: expected values in [1, {longest}], got {lengths}")
    return {str(n): {kind: values[n - 1] for kind, values in curves.items()} for n in lengths}


def position_curves(
    graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh, group: str, length: int, num_sequences: int
) -> dict[str, list[float]]:
    """The curves of the model ``(graphdef, params)`` on the fixed evaluation set (run under ``mesh``)."""
    batch = evaluation_batch(group, length, num_sequences)
    with jax.set_mesh(mesh):
        correct = correct_matrix(graphdef, params, batch["inputs"], batch["targets"])
    return accuracy_curves(correct)


def evaluate_positions(trainer: Any, group: str, length: int, num_sequences: int) -> dict[str, list[float]]:
    """The curves of a trained :class:`~m2rnn_jax.train.trainer.Trainer`'s model on the fixed evaluation set."""
    return position_curves(trainer.graphdef, trainer.state.params, trainer.mesh, group, length, num_sequences)
