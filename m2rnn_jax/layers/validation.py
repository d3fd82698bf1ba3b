"""Config and constructor checks shared by the layers: errors name the field and the value received."""

from __future__ import annotations

from typing import Any


def require_positive_int(name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a positive int (bools rejected)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
