"""Small validation helpers shared by the config dataclasses: errors name the field, the expectation and the value."""

from __future__ import annotations

from typing import Any


def require(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raises ``ValueError("{field}: expected {expected}, got {value!r}")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


def is_int(value: Any) -> bool:
    """True for ints that are not bools."""
    return isinstance(value, int) and not isinstance(value, bool)
