"""Frozen dataclass configs <-> plain dicts, and ``key.sub=value`` overrides, with errors that name the key.

Works on any tree of frozen dataclasses (the training config holds the model config, which holds the mixer
configs). Field types come from the dataclass annotations; a value is coerced to the field type (int -> float,
list -> tuple, dict -> nested dataclass). Fields typed as a union of dataclasses (the decoder's ``mlp``:
``MLPConfig | MoEConfig``) pick the member whose fields cover the given keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _unknown_key_error(key: str, where: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where or 'config'}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _type_name(annotation: Any) -> str:
    return " | ".join(getattr(m, "__name__", str(m)) for m in _union_members(annotation))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to ``annotation`` (a field type), or ValueError naming ``where``."""
    members = _union_members(annotation)
    if value is None:
        if type(None) in members:
            return None
        raise ValueError(f"{where}: expected {_type_name(annotation)}, got None")
    dataclass_members = [m for m in members if dataclasses.is_dataclass(m)]
    if dataclass_members:
        if dataclasses.is_dataclass(value) and type(value) in dataclass_members:
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping of fields, got {value!r}")
        for cls in dataclass_members:
            if set(value) <= {f.name for f in dataclasses.fields(cls)}:
                return from_dict(cls, value, where)
        valid = sorted({f.name for cls in dataclass_members for f in dataclasses.fields(cls)})
        raise _unknown_key_error(sorted(set(value) - set(valid))[0] if set(value) - set(valid) else "?", where, valid)
    for member in members:
        origin = typing.get_origin(member) or member
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(member)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
            return tuple(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if origin is bool and isinstance(value, bool):
            return value
        if origin is str and isinstance(value, str):
            return value
        if origin is Any:
            return value
    raise ValueError(f"{where}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Builds the dataclass ``cls`` from ``data`` (nested mappings for nested configs); unknown keys raise."""
    types_ = _field_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key_error(key, where, valid)
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{where or cls.__name__}: {err}") from err


def to_dict(config: Any) -> Any:
    """A JSON/YAML-ready nested dict of a dataclass config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(item) for item in config]
    return config


def merge(config: Any, data: Mapping[str, Any], where: str = "") -> Any:
    """A copy of ``config`` with the (nested) values of ``data`` replaced; nested mappings merge recursively."""
    types_ = _field_types(type(config))
    valid = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key_error(key, where, valid)
        path = f"{where}.{key}" if where else key
        current = getattr(config, key)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, path)
        else:
            changes[key] = _coerce(value, types_[key], path)
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as err:
        derived = _rederive(config, changes)
        if derived is not None:
            return derived
        if not where or str(err).startswith(where):
            raise ValueError(str(err)) from err
        raise ValueError(f"{where}: {err}") from err


def _rederive(config: Any, changes: dict[str, Any]) -> Any:
    """Retry a rejected change with the fields that default to None (and were not changed) reset to None.

    Such fields are derived from others in ``__post_init__`` (e.g. ``num_v_heads`` defaults to ``num_heads``), so
    ``--set model.m2rnn.num_heads=16`` should re-derive them rather than keep the old values. Returns None if the
    retry fails too.
    """
    derived = {f.name: None for f in dataclasses.fields(config) if f.default is None and f.name not in changes}
    if not derived:
        return None
    try:
        return dataclasses.replace(config, **changes, **derived)
    except (TypeError, ValueError):
        return None


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars/lists (``3``, ``1e-3``, ``true``, ``[64, 256]``, ``null``), else the text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            return value
    return value


def parse_assignment(assignment: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], parsed value)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"--set: expected key.sub=value, got {assignment!r}")
    return key.strip().split("."), parse_value(text.strip())


def apply_overrides(config: Any, assignments: list[str]) -> Any:
    """Applies ``["optimizer.learning_rate=1e-3", "model.m2rnn.num_heads=8", ...]`` together (later ones win), so
    the result is validated once, whatever the order."""
    combined: dict[str, Any] = {}
    for assignment in assignments:
        path, value = parse_assignment(assignment)
        _check_path_exists(config, path)
        node = combined
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return merge(config, combined) if combined else config


def _check_path_exists(config: Any, path: list[str]) -> None:
    node, where = config, ""
    for part in path[:-1]:
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"{where}: is not a config section, cannot set {'.'.join(path)!r}")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise _unknown_key_error(part, where, names)
        node, where = getattr(node, part), f"{where}.{part}" if where else part
        if node is None:
            raise ValueError(
                f"{where}: this section is not set (None) in the current config, so {'.'.join(path)!r} cannot be "
                f"changed; set the whole section in a --config file instead"
            )
