"""The training budgets of the state-tracking comparison: the same steps, batch, schedule and curriculum for every
model, one recipe for a GPU (the paper's setting: train at 128, evaluate to 512) and a reduced one for a CPU."""

from __future__ import annotations

import dataclasses

from experiments.state_tracking.models import ModelSize, model_config
from m2rnn_jax.data.config import DataConfig
from m2rnn_jax.train.config import CheckpointConfig, OptimizerConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training budget shared by every model.

    ``curriculum``: ``((fraction of steps, length), ...)``: from ``fraction * steps`` on, train at ``length``
    (the first fraction is 0, the last length is ``train_length``). ``lengths``: where the table reads the
    accuracy curves, which run from 1 to ``max(lengths)`` over ``eval_sequences`` fixed sequences.
    """

    size: ModelSize
    train_length: int
    curriculum: tuple[tuple[float, int], ...]
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    lengths: tuple[int, ...]
    eval_sequences: int

    def __post_init__(self):
        if self.curriculum[0][0] != 0 or self.curriculum[-1][1] != self.train_length:
            raise ValueError(
                f"curriculum: expected to start at fraction 0 and end at length {self.train_length}, "
                f"got {self.curriculum}"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size: expected >= 1, got {self.steps} and {self.batch_size}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths: expected positive lengths, got {self.lengths}")

    def curriculum_steps(self) -> tuple[tuple[int, int], ...]:
        """The curriculum in steps (stages that would start at the same step keep the later length)."""
        stages: dict[int, int] = {}
        for fraction, length in self.curriculum:
            stages[int(round(fraction * self.steps))] = length
        return tuple(sorted(stages.items()))

    def with_train_length(self, train_length: int) -> Recipe:
        """This recipe trained at ``train_length``, its curriculum lengths scaled by the same factor (a stage is
        never shorter than 2, nor than ``train_length``: a length-1 sequence has nothing to compose)."""
        if train_length < 1:
            raise ValueError(f"train_length: expected >= 1, got {train_length}")
        scale = train_length / self.train_length
        shortest = min(2, train_length)
        stages = tuple((fraction, max(shortest, round(length * scale))) for fraction, length in self.curriculum[:-1])
        return dataclasses.replace(
            self, train_length=train_length, curriculum=stages + ((self.curriculum[-1][0], train_length),)
        )

    def describe(self) -> str:
        """One line stating the budget (printed above every table)."""
        stages = " -> ".join(f"{length} from step {step}" for step, length in self.curriculum_steps())
        warmup = min(self.warmup_steps, self.steps)
        return (
            f"{self.steps} steps of {self.batch_size} sequences (curriculum: {stages}), AdamW lr "
            f"{self.learning_rate:g} (warmup {warmup}, cosine to 10%), weight decay 0.1, gradient clip 1, "
            f"{self.size.num_layers} layers of width {self.size.hidden_size} ({self.size.dtype}), "
            f"evaluated on {self.eval_sequences} sequences of length {max(self.lengths)}"
        )


RECIPES: dict[str, Recipe] = {
    # One H200: every model and seed of the S3 figure in call 1 of experiments/state_tracking/h200.sh (~560 GPU
    # seconds estimated; the call's deadlines cut what does not fit and the same call again resumes it).
    # Two curriculum stages, not three: each new length is one more compile of every model's train step.
    "gpu": Recipe(
        size=ModelSize(hidden_size=128, num_layers=2),
        train_length=128,
        curriculum=((0.0, 32), (0.3, 128)),
        steps=3000,
        batch_size=128,
        learning_rate=3e-3,
        warmup_steps=100,
        lengths=(16, 64, 128, 256, 384, 512),
        eval_sequences=1024,
    ),
    # A 2-core CPU: train at 32, evaluate to 4x (minutes per model).
    "cpu": Recipe(
        size=ModelSize(hidden_size=64, num_layers=2),
        train_length=32,
        curriculum=((0.0, 8), (0.5, 32)),
        steps=1500,
        batch_size=32,
        learning_rate=5e-3,
        warmup_steps=100,
        lengths=(8, 16, 32, 64, 128),
        eval_sequences=256,
    ),
}


def train_config(recipe: Recipe, model: str, group: str, seed: int) -> TrainConfig:
    """The :class:`TrainConfig` of one run of the comparison (model and data seeded by ``seed``)."""
    return TrainConfig(
        model=model_config(model, group, recipe.size),
        optimizer=OptimizerConfig(
            learning_rate=recipe.learning_rate, warmup_steps=min(recipe.warmup_steps, recipe.steps)
        ),
        data=DataConfig(
            kind="state_tracking",
            group=group,
            seq_len=recipe.train_length,
            curriculum=recipe.curriculum_steps(),
            eval_lengths=(recipe.train_length,),
            eval_batch_size=min(recipe.eval_sequences, 256),
            seed=seed,
        ),
        checkpoint=CheckpointConfig(every_steps=recipe.steps, keep=1, async_save=False),
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        log_every=max(recipe.steps // 10, 1),
        seed=seed,
    )
