"""Packed token files: a flat array of token ids (``.bin`` raw uint16/uint32, or ``.npy``), memory-mapped.

The file is cut into windows of ``seq_len + 1`` tokens at stride ``seq_len`` (inputs = window[:-1], targets =
window[1:]). Training reads the windows in a random order per epoch that is a pure function of (seed, epoch),
so the global sample ``i`` (= step * batch_size + row) is always the same window: resuming at a step, or cutting
a batch into per-process rows, needs no iterator state. The last ``eval_fraction`` of the file (or a separate
file) is held out for evaluation and read in order.

With ``eos_token_id`` set, each window also gets ``segment_ids`` (B, S): a new document starts after every EOS
token, for mixers that reset at document boundaries (SPEC §0.5).

A *prepared directory* (written by ``m2rnn-jax prepare-data``, see :mod:`m2rnn_jax.data.text`) holds
``train.bin``, ``validation.bin``, the tokenizer and ``meta.json`` (dtype, vocabulary, EOS id): read it with
:func:`read_prepared`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from m2rnn_jax.data.atomic import atomic_file

SUPPORTED_FORMAT_VERSIONS = (1,)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """What ``meta.json`` of a prepared directory says (paths resolved against the directory)."""

    directory: Path
    vocab_size: int
    eos_token_id: int
    dtype: str
    train_file: Path
    validation_file: Path
    tokenizer_files: tuple[str, ...]


def is_prepared(path: str | Path | None) -> bool:
    """True if ``path`` is a directory (a prepared one, or meant to be: :func:`read_prepared` says what is wrong)."""
    return path is not None and Path(path).is_dir()


def read_prepared(directory: str | Path) -> PreparedData:
    """The ``meta.json`` of a directory written by ``m2rnn-jax prepare-data`` (ValueError naming what is missing)."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise ValueError(
            f"data.path: expected a token file (.bin/.npy) or a directory written by m2rnn-jax "
            f"prepare-data (holding meta.json), got the directory {str(directory)!r} without meta.json"
        )
    try:
        meta = json.loads(meta_path.read_text())
        version = meta.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"data.path: expected meta.json format_version in {SUPPORTED_FORMAT_VERSIONS}, "
                f"got {version!r} in {str(meta_path)!r}"
            )
        return PreparedData(
            directory=directory,
            vocab_size=int(meta["vocab_size"]),
            eos_token_id=int(meta["eos_token_id"]),
            dtype=str(meta["dtype"]),
            train_file=directory / meta["splits"]["train"]["file"],
            validation_file=directory / meta["splits"]["validation"]["file"],
            tokenizer_files=tuple(meta["tokenizer"]["files"]),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"data.path: {str(meta_path)!r} is not a valid meta.json ({type(err).__name__}: {err})"
        ) from err


def copy_tokenizer(prepared: PreparedData, workdir: str | Path) -> list[Path]:
    """Copies the tokenizer files of ``prepared`` into ``workdir`` (atomically; ``eval``/``generate`` read them)."""
    copied = []
    for name in prepared.tokenizer_files:
        target = Path(workdir) / name
        with atomic_file(target) as temporary:
            shutil.copyfile(prepared.directory / name, temporary)
        copied.append(target)
    return copied


def open_tokens(path: str | Path, dtype: str = "uint16") -> np.ndarray:
    """A read-only memory map of the token file (``.npy`` carries its dtype; ``.bin`` uses ``dtype``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.path: no such token file {str(path)!r}")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    else:
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32, np.int32, np.int64):
        raise ValueError(f"data.path: expected a 1-D uint16/uint32 token array, got {tokens.dtype} {tokens.shape}")
    return tokens


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens from ``tokens[begin:end]`` (see the module docstring)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        *,
        begin: int = 0,
        end: int | None = None,
        eos_token_id: int | None = None,
    ):
        end = len(tokens) if end is None else end
        self.tokens, self.seq_len, self.begin = tokens, seq_len, begin
        self.num_windows = (end - begin - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"data.path: {end - begin} tokens are too few for one window of data.seq_len + 1 = {seq_len + 1}"
            )
        self.eos_token_id = eos_token_id

    def windows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows ``indices`` (n,) -> inputs/targets (n, seq_len) int32 (+ segment_ids)."""
        starts = self.begin + indices.astype(np.int64) * self.seq_len
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1]) for s in starts]).astype(np.int32)
        batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
        if self.eos_token_id is not None:
            is_eos = (batch["inputs"] == self.eos_token_id).astype(np.int32)
            batch["segment_ids"] = np.cumsum(is_eos, axis=1) - is_eos  # a document ends with its EOS token
        return batch

    def shuffled(self, seed: int, first_sample: int, count: int) -> dict[str, np.ndarray]:
        """Global samples ``first_sample .. first_sample + count - 1`` of the epoch-shuffled stream."""
        samples = np.arange(first_sample, first_sample + count, dtype=np.int64)
        epochs, positions = np.divmod(samples, self.num_windows)
        indices = np.empty_like(samples)
        for epoch in np.unique(epochs):
            order = np.random.Generator(np.random.PCG64([seed, int(epoch)])).permutation(self.num_windows)
            chosen = epochs == epoch
            indices[chosen] = order[positions[chosen]]
        return self.windows(indices)
