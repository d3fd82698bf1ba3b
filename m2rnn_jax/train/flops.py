"""Model FLOPs per trained token and peak device FLOP/s, for MFU.

Counted: 6 x every matmul parameter (embedding lookups excluded, the LM head included; MoE experts at their
active fraction), attention scores and values (12 x layers x heads x head_dim x seq_len, no causal halving), and
the M2RNN state matmul H_{t-1} W (6 x N x K x V x V per token and layer, forward + backward). Elementwise work,
the other recurrences' state updates and the conv are left out, so MFU is slightly understated for them.
"""

from __future__ import annotations

import jax

from m2rnn_jax.models import ModelConfig
from m2rnn_jax.models.counting import abstract_decoder, count_parameters

# bf16 dense matmul peaks by device kind (vendor numbers), FLOP/s per device.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (see the module docstring)."""
    counts = count_parameters(abstract_decoder(config))
    matmul_params = counts.active_non_embedding + (config.vocab_size * config.hidden_size)
    flops = 6.0 * matmul_params
    for letter in config.layer_pattern:
        if letter == "A":
            attention = config.attention
            head_dim = attention.head_dim or config.hidden_size // attention.num_heads
            flops += 12.0 * attention.num_heads * head_dim * seq_len
        elif letter == "M":
            m2rnn = config.m2rnn
            flops += 6.0 * m2rnn.num_heads * m2rnn.k_head_dim * m2rnn.v_head_dim**2
    return flops


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The bf16 peak of ``device`` (default: the first device), or None when unknown (e.g. CPUs)."""
    device = jax.devices()[0] if device is None else device
    kind = device.device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None
