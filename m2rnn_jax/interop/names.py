"""Whole-decoder parameter names: our Flax paths <-> lm-engine state-dict names, tensor by tensor.

The map is derived from the Flax parameter tree by a few rules (checked against the independent torch twin's
``state_dict`` in the tests, so a wrong rule fails loudly):

=================================  ====================================  ==========================================
Flax path                          lm-engine name                        layout (Flax -> lm-engine)
=================================  ====================================  ==========================================
``embed.embedding``                ``transformer.wte.weight``            same (vocab, h)
``blocks.{i}.norm1.scale``         ``transformer.h.{i}.ln_1.weight``     same
``blocks.{i}.mixer.<m>``           ``transformer.h.{i}.sequence_mixer.<m>``  per leaf, below
``blocks.{i}.norm2.scale``         ``transformer.h.{i}.ln_2.weight``     same
``blocks.{i}.mlp.<m>``             ``transformer.h.{i}.mlp_block.<m>``   per leaf, below
``final_norm.scale``               ``transformer.ln_f.weight``           same
``lm_head.kernel``                 ``lm_head.weight``                    transposed (h, vocab) -> (vocab, h)
=================================  ====================================  ==========================================

Leaves inside a mixer or MLP: ``<conv>.kernel`` (ks, C) of a module named ``conv1d`` / ``qkv_conv1d`` ->
``<conv>.weight`` (C, 1, ks); any other 2-D ``kernel`` (in, out) -> ``weight`` (out, in); a 3-D expert ``kernel``
(E, in, out) -> ``weight`` (E, out, in); a norm ``scale`` -> ``weight``; everything else (``bias``, ``A_log``,
``dt_bias``, ``D``, ``state_weight``) keeps its name and layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

__all__ = ["TensorName", "flax_path", "lm_engine_name", "name_map", "lm_engine_tensors", "params_from_tensors"]

_CONV_MODULES = ("conv1d", "qkv_conv1d")
_TOP_LEVEL = {
    "embed.embedding": "transformer.wte.weight",
    "final_norm.scale": "transformer.ln_f.weight",
}
_BLOCK_PARTS = {"norm1": "ln_1", "norm2": "ln_2", "mixer": "sequence_mixer", "mlp": "mlp_block"}


class TensorName(NamedTuple):
    """One parameter: its lm-engine name, the layout kind and both shapes.

    kind: ``copy`` (same layout), ``transpose`` (2-D), ``conv`` ((ks, C) <-> (C, 1, ks)) or ``experts``
    ((E, in, out) <-> (E, out, in)).
    """

    name: str
    kind: str
    flax_shape: tuple[int, ...]
    lm_engine_shape: tuple[int, ...]


_LM_SHAPES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "copy": lambda shape: shape,
    "transpose": lambda shape: shape[::-1],
    "conv": lambda shape: (shape[1], 1, shape[0]),
    "experts": lambda shape: (shape[0], shape[2], shape[1]),
}


def _to_lm(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "transpose":
        return x.T
    if kind == "conv":
        return x.T[:, None, :]
    if kind == "experts":
        return np.swapaxes(x, 1, 2)
    return x


def _from_lm(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return x[:, 0, :].T
    return _to_lm(kind, x)  # transpose and swapaxes are their own inverses


# Alignment (bytes) of the arrays params_from_tensors produces: JAX's CPU client wraps a 64-byte aligned NumPy
# array without copying it (jax.device_put), so an imported tensor exists once, not twice.
ALIGNMENT = 64


def aligned_copy(x: np.ndarray, dtype: Any) -> np.ndarray:
    """A C-contiguous copy of ``x`` cast to ``dtype``, whose data starts at a multiple of :data:`ALIGNMENT` bytes
    (one allocation; ``x`` may be a strided view, e.g. a transpose of a memory-mapped tensor)."""
    dtype = np.dtype(dtype)
    raw = np.empty(x.size * dtype.itemsize + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start : start + x.size * dtype.itemsize].view(dtype).reshape(x.shape)
    np.copyto(out, x, casting="unsafe")
    return out


def _pure(params: Any) -> Any:
    """An ``nnx.State`` as its pure nested dict (other trees unchanged)."""
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def flax_path(keys: tuple[Any, ...]) -> str:
    """A tree path (``jax.tree_util`` keys or plain keys) as a dotted string: ``blocks.0.mixer.D``."""
    return ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in keys)


def _leaf_rule(path: str, ndim: int) -> tuple[str, str]:
    """(lm-engine suffix, kind) of a leaf path inside a mixer or MLP."""
    *modules, leaf = path.split(".")
    if leaf == "kernel" and modules and modules[-1] in _CONV_MODULES:
        return ".".join(modules + ["weight"]), "conv"
    if leaf == "kernel":
        return ".".join(modules + ["weight"]), {2: "transpose", 3: "experts"}.get(ndim, "invalid")
    if leaf == "scale":
        return ".".join(modules + ["weight"]), "copy"
    return path, "copy"


def lm_engine_name(path: str, shape: tuple[int, ...]) -> TensorName:
    """The lm-engine name and layout of the Flax parameter at dotted ``path`` with ``shape``."""
    shape = tuple(int(n) for n in shape)
    if path in _TOP_LEVEL:
        return TensorName(_TOP_LEVEL[path], "copy", shape, shape)
    if path == "lm_head.kernel" and len(shape) == 2:
        return TensorName("lm_head.weight", "transpose", shape, shape[::-1])
    match = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|mixer|mlp)\.(.+)", path)
    if match is None:
        raise ValueError(
            f"path: expected a decoder parameter path (embed, blocks.<i>.*, final_norm, lm_head), got {path!r}"
        )
    index, part, rest = match.groups()
    suffix, kind = _leaf_rule(rest, len(shape))
    if kind == "invalid":
        raise ValueError(f"{path}: expected a 2-D or 3-D kernel, got shape {shape}")
    lm_shape = _LM_SHAPES[kind](shape)
    return TensorName(f"transformer.h.{index}.{_BLOCK_PARTS[part]}.{suffix}", kind, shape, lm_shape)


def name_map(params: Any) -> dict[str, TensorName]:
    """Flax path -> :class:`TensorName` for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    mapping = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(_pure(params)):
        path = flax_path(keys)
        mapping[path] = lm_engine_name(path, leaf.shape)
    names = [entry.name for entry in mapping.values()]
    if len(set(names)) != len(names):
        raise ValueError(f"params: two parameters map to the same lm-engine name: {sorted(names)}")
    return mapping


def lm_engine_tensors(params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (lm-engine name, NumPy array in lm-engine layout and the parameter's dtype), one tensor at a time.

    Works on parameters and on gradient trees of the same structure (the layout changes are linear).
    """
    for keys, leaf in jax.tree_util.tree_leaves_with_path(_pure(params)):
        path = flax_path(keys)
        entry = lm_engine_name(path, leaf.shape)
        yield entry.name, np.ascontiguousarray(_to_lm(entry.kind, np.asarray(jax.device_get(leaf))))


def params_from_tensors(
    template: Any, read: Callable[[str], np.ndarray], names: set[str], place: Callable[[np.ndarray], Any] = np.asarray
) -> Any:
    """A parameter tree shaped like ``template`` whose leaves are read by lm-engine name, one at a time.

    Args:
        template: parameter tree (``nnx.State`` or pure dict of arrays or ShapeDtypeStructs); only shapes and
            dtypes are used.
        read: lm-engine name -> NumPy array in lm-engine layout.
        names: every name the source holds (to report unexpected ones).
        place: applied to each converted leaf as soon as it is read (e.g. ``jax.device_put``, which on a CPU device
            wraps the aligned array without a copy, and elsewhere moves it to the device and drops the host copy
            before the next tensor is read).

    Returns a pure dict of ``place(array)`` in Flax layout, cast to the template dtypes; each array is a fresh
    aligned copy (:func:`aligned_copy`), so ``read`` may return views of a memory-mapped file. Raises ValueError
    listing missing and unexpected names, or naming a tensor of the wrong shape.
    """
    template = _pure(template)
    mapping = name_map(template)
    expected = {entry.name for entry in mapping.values()}
    missing, unexpected = sorted(expected - set(names)), sorted(set(names) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict: missing tensors {missing}; unexpected tensors {unexpected}")

    def convert(keys, leaf):
        entry = mapping[flax_path(keys)]
        tensor = read(entry.name)
        if tuple(tensor.shape) != entry.lm_engine_shape:
            raise ValueError(f"{entry.name}: expected shape {entry.lm_engine_shape}, got {tuple(tensor.shape)}")
        return place(aligned_copy(_from_lm(entry.kind, tensor), leaf.dtype))

    return jax.tree_util.tree_map_with_path(convert, template)
