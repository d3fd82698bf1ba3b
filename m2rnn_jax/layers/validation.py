"""Config and constructor checks shared by the layers: errors name the field and the value received."""

from __future__ import annotations

from typing import Any


def require_positive_int(name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a positive int (bools rejected)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def init_layer(layer: Any, hidden_size: Any, config: Any, *, num_layers: Any, dtype: Any) -> None:
    """The constructor preamble of the mixer and MLP classes: checks that ``hidden_size`` and ``num_layers`` are
    positive ints (ValueError naming the argument) and sets ``layer.hidden_size``, ``layer.config``, ``layer.dtype``.
    """
    require_positive_int("hidden_size", hidden_size)
    require_positive_int("num_layers", num_layers)
    layer.hidden_size = hidden_size
    layer.config = config
    layer.dtype = dtype
