"""The hybrid language model: config, presets, decoder, loss, generation and size accounting."""

from m2rnn_jax.models.config import ModelConfig
from m2rnn_jax.models.counting import count_parameters, model_summary, state_sizes
from m2rnn_jax.models.decoder import Decoder, DecoderBlock, DecoderOutput
from m2rnn_jax.models.generation import decode_step, generate, prefill, sample_logits
from m2rnn_jax.models.loss import LossMetrics, cross_entropy, language_model_loss, next_token_targets
from m2rnn_jax.models.presets import get_preset, list_presets, preset_description, register_preset, tiny_config

__all__ = [
    "Decoder",
    "DecoderBlock",
    "DecoderOutput",
    "LossMetrics",
    "ModelConfig",
    "count_parameters",
    "cross_entropy",
    "decode_step",
    "generate",
    "get_preset",
    "language_model_loss",
    "list_presets",
    "model_summary",
    "next_token_targets",
    "prefill",
    "preset_description",
    "register_preset",
    "sample_logits",
    "state_sizes",
    "tiny_config",
]
