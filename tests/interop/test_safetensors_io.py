"""Streaming safetensors reader / writer: exact round trips, shards, errors, and the reference library's view."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from m2rnn_jax.interop.safetensors_io import INDEX_FILE, SafetensorsReader, write_safetensors


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((2, 1, 4)),
        "c.bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "d.int": np.arange(6, dtype=np.int32).reshape(2, 3),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _write(path, tensors, **kwargs):
    write_safetensors(path, {k: (v.shape, v.dtype) for k, v in tensors.items()}, tensors.__getitem__, **kwargs)


def test_round_trip_is_exact(tmp_path):
    tensors = _tensors()
    _write(tmp_path / "model.safetensors", tensors, metadata={"format": "pt"})
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == set(tensors)
    for name, value in tensors.items():
        back = reader.read(name)
        assert back.dtype == value.dtype and back.shape == value.shape and back.tobytes() == value.tobytes()
    header_size = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert header_size % 8 == 0


def test_sharded_index(tmp_path):
    tensors = _tensors()
    first, second = dict(list(tensors.items())[:2]), dict(list(tensors.items())[2:])
    _write(tmp_path / "model-1.safetensors", first)
    _write(tmp_path / "model-2.safetensors", second)
    weight_map = {**{k: "model-1.safetensors" for k in first}, **{k: "model-2.safetensors" for k in second}}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == set(tensors)
    assert reader.read("d.int").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_failed_write_leaves_no_file(tmp_path):
    tensors = _tensors()
    specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"produce\('b'\): expected \(2, 1, 4\) float64, got \(2, 4\) float64"):
        write_safetensors(
            tmp_path / "m.safetensors", specs, lambda n: tensors[n].reshape(2, 4) if n == "b" else tensors[n]
        )
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_are_errors(tmp_path):
    with pytest.raises(ValueError, match="expected model.safetensors or model.safetensors.index.json"):
        SafetensorsReader(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(ValueError, match="bad JSON header"):
        SafetensorsReader(tmp_path / "x.safetensors")
    _write(tmp_path / "model.safetensors", _tensors())
    with pytest.raises(ValueError, match=r"no tensor 'zzz'"):
        SafetensorsReader(tmp_path).read("zzz")


def test_agrees_with_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    _write(tmp_path / "ours.safetensors", tensors)
    loaded = safetensors_numpy.load_file(str(tmp_path / "ours.safetensors"))
    assert all(loaded[k].tobytes() == v.tobytes() and loaded[k].shape == v.shape for k, v in tensors.items())
    safetensors_numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    reader = SafetensorsReader(tmp_path / "theirs.safetensors")
    assert all(reader.read(k).tobytes() == v.tobytes() for k, v in tensors.items())
