"""Tokenizers behind one small interface: Hugging Face ``tokenizers`` files, tiktoken BPE files, and byte-level
BPE trained on a corpus.

``load_tokenizer(path)`` accepts a ``tokenizer.json``, a ``.tiktoken`` file, or a directory holding either (a
directory written by :meth:`Tokenizer.save`). Every tokenizer has one end-of-document token (``eos_token_id``)
that the data pipeline appends after each document; text is encoded *without* recognising special tokens, so a
document that happens to contain the EOS string is encoded as ordinary text.

``token_byte_lengths()`` gives the number of UTF-8 bytes each token id stands for (special tokens: 0). It is exact
for byte-level tokenizers (byte-level BPE, tiktoken) and decodes each token alone otherwise
(``byte_lengths_exact`` says which); the evaluation turns it into bits per byte.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from m2rnn_jax.data.atomic import atomic_file

HF_FILE = "tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
TIKTOKEN_CONFIG_FILE = "tiktoken_config.json"
TOKENIZER_FILES = (HF_FILE, TIKTOKEN_FILE, TIKTOKEN_CONFIG_FILE)
DEFAULT_EOS = "<|endoftext|>"
EOS_CANDIDATES = (DEFAULT_EOS, "</s>", "<|end_of_text|>", "<eos>", "[EOS]")
# Pre-tokenization for tiktoken files, which do not carry theirs: contractions, letter runs, digit runs,
# punctuation runs (each with one optional leading space), then whitespace.
DEFAULT_TIKTOKEN_PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    """What the data pipeline, evaluation and generation need from a tokenizer."""

    kind: str  # "huggingface" or "tiktoken"
    vocab_size: int
    eos_token_id: int
    byte_lengths_exact: bool

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_byte_lengths(self) -> np.ndarray: ...

    def save(self, directory: str | Path) -> list[Path]: ...


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"ids: expected token ids in [0, {vocab_size}), got {bad[:5]}")
    return ids


def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte -> printable character table of byte-level BPE (GPT-2's convention): printable
    Latin-1 bytes stand for themselves, the others are shifted to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def _uses_byte_level(node: object) -> bool:
    """True if a tokenizer.json component (or a Sequence of them) is ByteLevel."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return True
        return any(_uses_byte_level(child) for key in ("decoders", "pretokenizers") for child in node.get(key, []))
    return False


class HuggingFaceTokenizer:
    """A ``tokenizers.Tokenizer`` (Rust; ``encode_batch`` runs on all cores) with an EOS token."""

    kind = "huggingface"

    def __init__(self, tokenizer, eos_token: str | None = None):
        self._tokenizer = tokenizer
        tokenizer.encode_special_tokens = True  # special-token strings inside documents are plain text
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        found = [tokenizer.token_to_id(name) for name in names]
        found = [i for i in found if i is not None]
        if not found:
            raise ValueError(f"tokenizer: expected an EOS token, one of {list(names)}, in the vocabulary, got none")
        self.eos_token_id = int(found[0])
        self._spec = json.loads(tokenizer.to_str())
        self.byte_lengths_exact = _uses_byte_level(self._spec.get("decoder"))

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = None) -> HuggingFaceTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises its own exception type for unreadable files
            raise ValueError(f"tokenizer: cannot read {str(path)!r} as a tokenizer.json ({err})") from err
        return cls(tokenizer, eos_token)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20): all cores, no character offsets (about 30% faster than
        # encode_batch on source code, 2-core measurement in docs/text_data.md)
        return [e.ids for e in self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens appear as their strings (so decode inverts the token files)."""
        return self._tokenizer.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int32: UTF-8 bytes per token (exact for byte-level BPE; special tokens 0)."""
        lengths = np.zeros(self.vocab_size, np.int32)
        added = {int(t["id"]): t for t in self._spec.get("added_tokens", [])}
        byte_of = _byte_decoder()
        for token, index in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if index in added:
                entry = added[index]
                lengths[index] = 0 if entry["special"] else len(entry["content"].encode("utf-8"))
            elif self.byte_lengths_exact and all(ch in byte_of for ch in token):
                lengths[index] = len(token)
            else:
                lengths[index] = len(self._tokenizer.decode([index]).encode("utf-8"))
        return lengths

    def save(self, directory: str | Path) -> list[Path]:
        path = Path(directory) / HF_FILE
        with atomic_file(path) as temporary:
            self._tokenizer.save(str(temporary))
        return [path]


class TiktokenTokenizer:
    """A tiktoken BPE (``.tiktoken``: one ``base64(token) rank`` per line) with EOS appended after the ranks
    unless ``special_tokens`` says otherwise."""

    kind = "tiktoken"
    byte_lengths_exact = True

    def __init__(
        self,
        ranks: dict[bytes, int],
        *,
        pattern: str = DEFAULT_TIKTOKEN_PATTERN,
        special_tokens: dict[str, int] | None = None,
        eos_token: str = DEFAULT_EOS,
    ):
        import tiktoken

        special_tokens = dict(special_tokens or {eos_token: len(ranks)})
        if eos_token not in special_tokens:
            raise ValueError(
                f"tokenizer: expected the EOS token {eos_token!r} among the special tokens, "
                f"got {sorted(special_tokens)}"
            )
        self._ranks, self._pattern, self._special = ranks, pattern, special_tokens
        self._encoding = tiktoken.Encoding(
            "m2rnn", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        self.vocab_size = int(self._encoding.n_vocab)
        self.eos_token_id = int(special_tokens[eos_token])
        self._eos_token = eos_token

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = None) -> TiktokenTokenizer:
        """Reads ``path`` and, if present, ``tiktoken_config.json`` next to it (pattern, special tokens, EOS);
        ``eos_token`` names the EOS token (default: the config's, else ``<|endoftext|>``)."""
        path = Path(path)
        ranks: dict[bytes, int] = {}
        try:
            for line in path.read_text().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"tokenizer: cannot read {str(path)!r} as a .tiktoken BPE file ({err})") from err
        if not ranks:
            raise ValueError(f"tokenizer: expected token ranks in {str(path)!r}, got an empty file")
        config_path = path.with_name(TIKTOKEN_CONFIG_FILE)
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(
            ranks,
            pattern=config.get("pattern", DEFAULT_TIKTOKEN_PATTERN),
            special_tokens=config.get("special_tokens"),
            eos_token=eos_token or config.get("eos_token", DEFAULT_EOS),
        )

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        import os

        return self._encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode_bytes(_check_ids(ids, self.vocab_size)).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, np.int32)
        for token, rank in self._ranks.items():
            lengths[rank] = len(token)
        return lengths

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        paths = [directory / TIKTOKEN_FILE, directory / TIKTOKEN_CONFIG_FILE]
        lines = "".join(
            f"{base64.b64encode(token).decode()} {rank}\n"
            for token, rank in sorted(self._ranks.items(), key=lambda item: item[1])
        )
        config = {"pattern": self._pattern, "special_tokens": self._special, "eos_token": self._eos_token}
        for path, text in zip(paths, (lines, json.dumps(config, indent=2) + "\n")):
            with atomic_file(path) as temporary:
                temporary.write_text(text)
        return paths


def load_tokenizer(path: str | Path, *, eos_token: str | None = None) -> Tokenizer:
    """The tokenizer in ``path``: a ``tokenizer.json``, a ``.tiktoken`` file, or a directory holding one.

    ``eos_token`` names the end-of-document token (default for a ``tokenizer.json``: the first of
    ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``, ``[EOS]`` in its vocabulary; for a ``.tiktoken``
    file: the one in ``tiktoken_config.json``, else ``<|endoftext|>``, appended after the ranks).
    """
    path = Path(path)
    if path.is_dir():
        for name in (HF_FILE, TIKTOKEN_FILE):
            if (path / name).is_file():
                return load_tokenizer(path / name, eos_token=eos_token)
        raise ValueError(
            f"tokenizer: expected {HF_FILE} or {TIKTOKEN_FILE} in the directory {str(path)!r}, "
            f"got {sorted(p.name for p in path.iterdir())[:10]}"
        )
    if not path.is_file():
        raise ValueError(
            f"tokenizer: expected a tokenizer.json, a .tiktoken file or a directory, got {str(path)!r} (no such file)"
        )
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path, eos_token)
    return HuggingFaceTokenizer.from_file(path, eos_token)


def check_train_vocab_size(vocab_size: int) -> None:
    """ValueError unless ``vocab_size`` holds the 256 byte tokens and the EOS token."""
    minimum = 256 + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"--train-tokenizer: expected a vocabulary of at least {minimum} (256 bytes + EOS), got {vocab_size}"
        )


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, *, eos_token: str = DEFAULT_EOS, show_progress: bool = False
) -> HuggingFaceTokenizer:
    """A byte-level BPE with ``vocab_size`` tokens (the 256 bytes, ``eos_token`` and merges) trained on ``texts``.

    The vocabulary may come out smaller when the corpus has fewer distinct merges than asked for.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_train_vocab_size(vocab_size)
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HuggingFaceTokenizer(tokenizer, eos_token)
