"""Text corpora -> tokenized train/validation token files (the library behind ``m2rnn-jax prepare-data``).

A corpus is a list of documents read from local files (``.txt``, ``.jsonl``, ``.parquet``) or a Hugging Face
dataset (``datasets``; a ``save_to_disk`` folder or a local data folder works offline). :func:`prepare_text_data`
splits the documents into train and validation (by document, deterministic in ``seed``), tokenizes them in
batches (the tokenizer's ``encode_batch`` runs on all cores) and writes, in the output directory:

- ``train.bin`` / ``validation.bin``: the token ids of the split's documents in corpus order, an EOS token after
  every document, raw ``uint16`` (vocabularies up to 65536) or ``uint32``;
- ``train.offsets.npy`` / ``validation.offsets.npy``: (documents,) int64, where each document starts;
- the tokenizer (``tokenizer.json``, or ``tokenizer.tiktoken`` + ``tiktoken_config.json``);
- ``meta.json`` (:data:`FORMAT_VERSION`; see ``docs/text_data.md``), written last.

Every file is written under a temporary name and renamed when complete, and an old ``meta.json`` is deleted
before the first file is written (after the corpus has been read once without error), so an interrupted run
never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer, check_train_vocab_size, train_byte_level_bpe

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "validation")
TXT_DOCUMENTS = ("file", "paragraph")
SUFFIXES = (".txt", ".jsonl", ".parquet")
BATCH_DOCUMENTS = 1024  # documents per encode_batch call
BATCH_CHARACTERS = 1_000_000  # ... or fewer when they are long (memory: the Rust encodings of a batch)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Where the documents come from: local ``inputs`` (files or globs) or a Hugging Face dataset.

    txt_documents: ``file`` (each .txt file is one document) or ``paragraph`` (blank-line-separated blocks).
    text_field: the text column of .jsonl / .parquet files and datasets.
    """

    inputs: tuple[str, ...] = ()
    txt_documents: str = "file"
    text_field: str = "text"
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    files: tuple[Path, ...] = dataclasses.field(init=False, default=())

    def __post_init__(self):
        if self.txt_documents not in TXT_DOCUMENTS:
            raise ValueError(f"--txt-documents: expected one of {TXT_DOCUMENTS}, got {self.txt_documents!r}")
        if bool(self.inputs) == bool(self.hf_dataset):
            raise ValueError(
                f"INPUT: expected input files or --hf-dataset (exactly one of them), got "
                f"inputs={list(self.inputs)} and hf_dataset={self.hf_dataset!r}"
            )
        if self.inputs:
            object.__setattr__(self, "files", tuple(expand_inputs(self.inputs)))

    @property
    def sources(self) -> list[str]:
        """The files (or the dataset) read, for meta.json."""
        if self.hf_dataset:
            return [f"hf:{self.hf_dataset}" + (f":{self.hf_config}" if self.hf_config else "") + f"[{self.hf_split}]"]
        return [str(path) for path in self.files]

    def __iter__(self) -> Iterator[str]:
        """Every non-empty document, in order (each call reads the sources again)."""
        if self.hf_dataset:
            documents = hf_documents(self.hf_dataset, self.hf_split, self.hf_config, self.text_field)
        else:
            documents = (
                doc for path in self.files for doc in file_documents(path, self.txt_documents, self.text_field)
            )
        return (doc for doc in documents if doc)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, ``**`` recursive), in order, without repeats."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [Path(m) for m in matches if Path(m).is_file()]
        if not matches:
            raise ValueError(f"INPUT: no files matched {pattern!r}")
        for path in matches:
            if path.suffix not in SUFFIXES:
                raise ValueError(f"INPUT: expected files ending in {', '.join(SUFFIXES)}, got {str(path)!r}")
            if path not in files:
                files.append(path)
    return files


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, endings kept, read as a stream (ValueError naming the file if unreadable)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from f
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"INPUT: cannot read {str(path)!r} as UTF-8 text ({err})") from err


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Blocks of lines separated by blank lines (only spaces/tabs), without their outer line breaks."""
    block: list[str] = []
    for line in lines:
        if line.strip(" \t\r\n"):
            block.append(line)
        elif block:
            yield "".join(block).strip("\r\n")
            block = []
    if block:
        yield "".join(block).strip("\r\n")


def _field_error(field: str, where: str, found: Sequence[str]) -> ValueError:
    return ValueError(f"--text-field: expected a field {field!r} in {where}, got the fields {sorted(found)}")


def file_documents(path: Path, txt_documents: str = "file", text_field: str = "text") -> Iterator[str]:
    """The documents of one local file (see :class:`Corpus`), read as a stream."""
    if path.suffix == ".txt":
        if txt_documents == "file":
            yield "".join(_lines(path))
        else:
            yield from _paragraphs(_lines(path))
    elif path.suffix == ".jsonl":
        for number, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"INPUT: {str(path)!r} line {number} is not JSON ({err})") from err
            if not isinstance(record, dict) or text_field not in record:
                found = list(record) if isinstance(record, dict) else []
                raise _field_error(text_field, f"{str(path)!r} line {number}", found)
            yield _as_text(record[text_field], text_field, f"{str(path)!r} line {number}")
    else:
        yield from _parquet_documents(path, text_field)


def _as_text(value: object, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"--text-field: expected {field!r} to hold strings in {where}, got {type(value).__name__}")
    return value


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for unreadable files
        raise ValueError(f"INPUT: cannot read {str(path)!r} as parquet ({err})") from err
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise _field_error(text_field, repr(str(path)), names)
    for batch in parquet.iter_batches(columns=[text_field], batch_size=BATCH_DOCUMENTS):
        for value in batch.column(0).to_pylist():
            yield _as_text(value, text_field, repr(str(path)))


def load_hf_dataset(name: str, split: str, config: str | None = None):
    """A ``datasets.Dataset``: a ``save_to_disk`` folder (``load_from_disk``) or anything ``load_dataset`` takes
    (a local data folder, or a Hub name when online)."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"--hf-split: expected one of {sorted(dataset)} in {name!r}, got {split!r}")
                dataset = dataset[split]
            return dataset
        return datasets.load_dataset(name, config, split=split)
    except ValueError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise ValueError(f"--hf-dataset: cannot load {name!r} split {split!r} ({type(err).__name__}: {err})") from err


def hf_documents(name: str, split: str, config: str | None, text_field: str) -> Iterator[str]:
    """The ``text_field`` values of a Hugging Face dataset split."""
    dataset = load_hf_dataset(name, split, config)
    if text_field not in dataset.column_names:
        raise _field_error(text_field, f"dataset {name!r}", dataset.column_names)
    for batch in dataset.select_columns([text_field]).iter(batch_size=BATCH_DOCUMENTS):
        for value in batch[text_field]:
            yield _as_text(value, text_field, f"dataset {name!r}")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def validation_documents(num_documents: int, fraction: float, seed: int) -> np.ndarray:
    """(num_documents,) bool: which documents go to validation (``round(fraction * n)``, at least 1 and at most
    n - 1, chosen uniformly with ``seed``)."""
    _check_fraction(fraction)
    if num_documents < 2:
        raise ValueError(f"INPUT: expected at least 2 non-empty documents (train and validation), got {num_documents}")
    count = min(max(1, round(fraction * num_documents)), num_documents - 1)
    chosen = np.zeros(num_documents, bool)
    chosen[np.random.default_rng(seed).choice(num_documents, size=count, replace=False)] = True
    return chosen


class _SplitWriter:
    """Appends documents (token ids + EOS) to an open token file; counts documents, tokens and bytes."""

    def __init__(self, file: BinaryIO, dtype: np.dtype, eos_token_id: int):
        self.file, self.dtype, self.eos = file, dtype, eos_token_id
        self.offsets: list[int] = []
        self.tokens = self.bytes = 0

    def add(self, ids: list[int], text: str) -> None:
        self.offsets.append(self.tokens)
        array = np.asarray(ids + [self.eos], dtype=self.dtype)
        self.file.write(array.tobytes())
        self.tokens += len(array)
        self.bytes += len(text.encode("utf-8"))


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch, characters = [], 0
    for doc in documents:
        batch.append(doc)
        characters += len(doc)
        if len(batch) >= BATCH_DOCUMENTS or characters >= BATCH_CHARACTERS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def prepare_output_directory(output: str | Path) -> Path:
    """Creates ``output`` if needed and checks that it is writable (ValueError naming --output otherwise)."""
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--output: expected a writable directory, got {str(output)!r} ({err})") from err
    return output


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ValueError(f"--validation-fraction: expected a value in (0, 1), got {fraction}")


def count_documents(corpus: Corpus) -> int:
    """The number of non-empty documents (a full read of the sources)."""
    count = sum(1 for _ in corpus)
    if count == 0:
        raise ValueError(f"INPUT: the corpus is empty (no non-empty documents in {corpus.sources})")
    return count


def write_token_files(
    corpus: Corpus, tokenizer: Tokenizer, output: Path, is_validation: np.ndarray, *, progress: bool = True
) -> dict[str, dict[str, object]]:
    """Tokenizes every document into the split ``is_validation`` gives it; returns meta.json's ``splits``."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    with contextlib.ExitStack() as stack:  # on error every temporary file is deleted, on success renamed
        writers = {}
        for split in SPLITS:
            temporary = stack.enter_context(atomic_file(output / f"{split}.bin"))
            writers[split] = _SplitWriter(stack.enter_context(open(temporary, "wb")), dtype, tokenizer.eos_token_id)
        bar = stack.enter_context(
            tqdm(total=len(is_validation), unit="doc", desc="tokenizing", file=sys.stderr, disable=not progress)
        )
        index = 0
        for batch in _batches(iter(corpus)):
            for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                writers["validation" if is_validation[index] else "train"].add(ids, text)
                index += 1
            bar.update(len(batch))
        if index != len(is_validation):
            raise ValueError(
                f"INPUT: the corpus changed while reading it ({len(is_validation)} documents "
                f"counted, {index} tokenized)"
            )
    splits = {}
    for split, writer in writers.items():
        offsets_name = f"{split}.offsets.npy"
        with atomic_file(output / offsets_name) as temporary, open(temporary, "wb") as f:
            np.save(f, np.asarray(writer.offsets, dtype=np.int64))
        splits[split] = {
            "file": f"{split}.bin",
            "offsets": offsets_name,
            "tokens": writer.tokens,
            "documents": len(writer.offsets),
            "bytes": writer.bytes,
        }
    return splits


def prepare_text_data(
    corpus: Corpus,
    output: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    train_vocab_size: int | None = None,
    tokenizer_source: str = "",
    validation_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Writes the token files, tokenizer and meta.json of ``corpus`` to ``output``; returns the meta dict.

    Give ``tokenizer`` (an existing one, described by ``tokenizer_source``) or ``train_vocab_size`` (a
    byte-level BPE trained on the training documents).
    """
    if (tokenizer is None) == (train_vocab_size is None):
        raise ValueError("tokenizer: expected --tokenizer PATH or --train-tokenizer VOCAB_SIZE (exactly one)")
    if train_vocab_size is not None:
        check_train_vocab_size(train_vocab_size)  # the cheap checks come before reading the corpus
    _check_fraction(validation_fraction)
    output = prepare_output_directory(output)
    is_validation = validation_documents(count_documents(corpus), validation_fraction, seed)
    for name in (META_FILE, *TOKENIZER_FILES):  # from here on the directory is not a finished one
        (output / name).unlink(missing_ok=True)
    if tokenizer is None:
        train_texts = (doc for doc, held_out in zip(corpus, is_validation) if not held_out)
        tokenizer = train_byte_level_bpe(train_texts, train_vocab_size, show_progress=progress)
        tokenizer_source = f"byte-level BPE trained on the training documents (asked vocab {train_vocab_size})"
    splits = write_token_files(corpus, tokenizer, output, is_validation, progress=progress)
    files = [path.name for path in tokenizer.save(output)]
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "kind": tokenizer.kind,
            "source": tokenizer_source,
            "files": files,
            "byte_lengths_exact": tokenizer.byte_lengths_exact,
        },
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "sources": corpus.sources,
    }
    with atomic_file(output / META_FILE) as temporary:
        temporary.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
