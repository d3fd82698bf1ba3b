"""Interoperability with PyTorch: independent torch twins (M2RNN layer, whole decoder), lm-engine names, configs and
checkpoint conversion (see docs/pytorch_interop.md).

PyTorch is optional (``pip install m2rnn-jax[torch]``); names are imported on first use so that
``import m2rnn_jax.interop`` works without it and fails with a clear message only when a torch
feature is touched.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "to_torch": "conversion",
    "to_jax": "conversion",
    "randomize_layer_params": "conversion",
    "m2rnn_torch": "torch_reference",
    "M2RNNTorch": "torch_reference",
    "torch_state_dict_from_flax": "conversion",
    "load_flax_into_torch": "conversion",
    "flax_params_from_torch_state_dict": "conversion",
    "torch_layer_from_flax": "conversion",
    "compare_layer_with_torch": "conversion",
    "DecoderTorch": "torch_decoder",
    "compare_model_with_torch": "model_parity",
    "torch_decoder_from_flax": "model_parity",
    "randomize_model_params": "model_parity",
    "to_lm_engine_config": "lm_engine_config",
    "from_lm_engine_config": "lm_engine_config",
    "name_map": "names",
    "lm_engine_tensors": "names",
    "params_from_tensors": "names",
    "SafetensorsReader": "safetensors_io",
    "write_safetensors": "safetensors_io",
    "import_lm_engine": "checkpoints",
    "export_lm_engine": "checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
