"""Streaming safetensors files with NumPy: read and write one tensor at a time (no second copy of a model).

Format (the public safetensors layout): 8 bytes little-endian header length N, N bytes of JSON header
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`` (padded with
spaces to a multiple of 8), then the raw little-endian tensor bytes; offsets count from the end of the header.
A checkpoint directory holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``{"weight_map": {name: file}}``), as Hugging Face ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from m2rnn_jax.data.atomic import atomic_file

__all__ = ["SafetensorsReader", "write_safetensors", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as file:
        raw = file.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(file.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header: {err})") from err
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Tensors of a safetensors file, or of a directory with ``model.safetensors`` or a sharded index.

    ``names()`` lists every tensor; ``read(name)`` returns one NumPy array (memory-mapped, then copied unless
    ``copy=False``).
    """

    def __init__(self, source: str | Path):
        source = Path(source)
        if source.is_dir():
            if (source / INDEX_FILE).exists():
                weight_map = json.loads((source / INDEX_FILE).read_text())["weight_map"]
                files = sorted({source / name for name in weight_map.values()})
            elif (source / SINGLE_FILE).exists():
                files = [source / SINGLE_FILE]
            else:
                raise ValueError(f"source: expected {SINGLE_FILE} or {INDEX_FILE} in {str(source)!r}, found neither")
        elif source.is_file():
            files = [source]
        else:
            raise ValueError(f"source: expected a safetensors file or directory, got {str(source)!r}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            header, data_start = _read_header(path)
            for name, entry in header.items():
                if name in self._entries:
                    raise ValueError(f"{path}: tensor {name!r} also appears in {self._entries[name][0]}")
                if entry.get("dtype") not in _DTYPES:
                    raise ValueError(
                        f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, expected one of {sorted(_DTYPES)}"
                    )
                self._entries[name] = (path, data_start, entry)

    def names(self) -> set[str]:
        return set(self._entries)

    def read(self, name: str, *, copy: bool = True) -> np.ndarray:
        """Tensor ``name`` as a NumPy array: a copy, or with ``copy=False`` a read-only view of the memory-mapped
        file (no memory of its own; the pages are read when used and released with the view)."""
        if name not in self._entries:
            raise ValueError(f"name: no tensor {name!r} in the safetensors source")
        path, data_start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, expected shape {shape} of {dtype}")
        if end == begin:
            return np.zeros(shape, dtype=dtype)
        mapped = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
        return np.array(mapped) if copy else mapped


def write_safetensors(
    path: str | Path,
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``path`` atomically: the header from ``specs`` (name -> (shape, dtype)), then ``produce(name)`` for
    each name in order, one array at a time (each must match its spec)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        if dtype not in _CODES:
            raise ValueError(f"specs[{name!r}]: dtype {dtype} has no safetensors code")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_file(path) as temporary, open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, (shape, dtype) in specs.items():
            array = np.asarray(produce(name))
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(
                    f"produce({name!r}): expected {tuple(shape)} {np.dtype(dtype)}, got {array.shape} {array.dtype}"
                )
            little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
            file.write(little.reshape(-1).view(np.uint8))  # the array's own bytes: no further copy
