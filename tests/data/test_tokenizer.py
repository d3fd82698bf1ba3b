"""Tokenizers: trained byte-level BPE, tokenizer.json files, tiktoken files; round trips, EOS, bytes per token."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from m2rnn_jax.data.tokenizer import (
    DEFAULT_EOS,
    HuggingFaceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    train_byte_level_bpe,
)

TEXTS = ["The cat sat on the mat.", "Café crème, naïve façade", "日本語のテキスト 😀 emoji", "tabs\tand\nlines  "]
TEXTS = TEXTS * 8


@pytest.fixture(scope="module")
def bpe() -> HuggingFaceTokenizer:
    return train_byte_level_bpe(TEXTS, 300)


def _tiktoken_file(path, merges=(b"th", b"he", b"the", b" c")):
    ranks = {bytes([i]): i for i in range(256)}
    for token in merges:
        ranks[token] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_trained_bpe_round_trips_and_counts_bytes_exactly(bpe):
    assert 257 < bpe.vocab_size <= 300 and bpe.kind == "huggingface" and bpe.byte_lengths_exact
    lengths = bpe.token_byte_lengths()
    assert lengths.shape == (bpe.vocab_size,) and lengths[bpe.eos_token_id] == 0
    for text in TEXTS[:4] + ["unseen words: Ωμέγα ∑ 🙂"]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert bpe.encode_batch(TEXTS[:4]) == [bpe.encode(t) for t in TEXTS[:4]]


def test_the_eos_string_inside_a_document_is_plain_text(bpe):
    ids = bpe.encode(f"before {DEFAULT_EOS} after")
    assert bpe.eos_token_id not in ids
    assert bpe.decode(ids) == f"before {DEFAULT_EOS} after"
    assert bpe.decode([bpe.eos_token_id]) == DEFAULT_EOS


def test_save_and_load_give_the_same_tokenizer(bpe, tmp_path):
    paths = bpe.save(tmp_path)
    assert [p.name for p in paths] == ["tokenizer.json"] and not list(tmp_path.glob(".*tmp*"))
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(source)
        assert loaded.encode_batch(TEXTS[:4]) == bpe.encode_batch(TEXTS[:4])
        assert loaded.eos_token_id == bpe.eos_token_id and loaded.vocab_size == bpe.vocab_size
        np.testing.assert_array_equal(loaded.token_byte_lengths(), bpe.token_byte_lengths())


def test_decode_rejects_ids_outside_the_vocabulary(bpe):
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, \d+\), got \[100000\]"):
        bpe.decode([1, 100000])


def test_vocabulary_below_bytes_plus_eos_is_rejected():
    with pytest.raises(ValueError, match="--train-tokenizer: expected a vocabulary of at least 257"):
        train_byte_level_bpe(TEXTS, 256)


def _word_level(tmp_path, tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "words.json"
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_json_needs_an_eos_token(tmp_path):
    path = _word_level(tmp_path, ["[UNK]", "hello", "world"])
    with pytest.raises(ValueError, match=r"tokenizer: expected an EOS token, one of \['<\|endoftext\|>'"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match=r"one of \['world!'\]"):
        load_tokenizer(path, eos_token="world!")


def test_non_byte_level_tokenizers_measure_bytes_by_decoding(tmp_path):
    from tokenizers import Tokenizer

    path = _word_level(tmp_path, ["[UNK]", "héllo", "world", "</s>"])
    rust = Tokenizer.from_file(str(path))
    rust.add_special_tokens(["</s>"])
    rust.save(str(path))
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token_id == 3 and not tokenizer.byte_lengths_exact
    np.testing.assert_array_equal(tokenizer.token_byte_lengths(), [5, 6, 5, 0])


def test_tiktoken_files_expose_the_same_interface(tmp_path):
    tokenizer = load_tokenizer(_tiktoken_file(tmp_path / "small.tiktoken"))
    assert isinstance(tokenizer, TiktokenTokenizer) and tokenizer.kind == "tiktoken"
    assert tokenizer.eos_token_id == 260 and tokenizer.vocab_size == 261  # EOS appended after the ranks
    text = f"the cat {DEFAULT_EOS} 😀"
    ids = tokenizer.encode(text)
    assert 258 in ids and tokenizer.eos_token_id not in ids  # "the" merged, the EOS string is plain text
    assert tokenizer.decode(ids) == text
    lengths = tokenizer.token_byte_lengths()
    assert int(lengths[ids].sum()) == len(text.encode()) and lengths[tokenizer.eos_token_id] == 0
    assert tokenizer.encode_batch([text, "he"]) == [ids, tokenizer.encode("he")]
    saved = tmp_path / "saved"
    saved.mkdir()
    assert [p.name for p in tokenizer.save(saved)] == ["tokenizer.tiktoken", "tiktoken_config.json"]
    loaded = load_tokenizer(saved)
    assert loaded.encode(text) == ids and loaded.eos_token_id == 260
    config = json.loads((saved / "tiktoken_config.json").read_text())
    assert config["special_tokens"] == {DEFAULT_EOS: 260}
    renamed = load_tokenizer(tmp_path / "small.tiktoken", eos_token="<|end|>")
    assert renamed.eos_token_id == 260 and renamed.decode([260]) == "<|end|>"
    with pytest.raises(ValueError, match=r"expected the EOS token '<\|end\|>' among the special tokens"):
        load_tokenizer(saved, eos_token="<|end|>")


def test_unreadable_tokenizers_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="expected tokenizer.json or tokenizer.tiktoken in the directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="cannot read .*bad.tiktoken.* as a .tiktoken BPE file"):
        load_tokenizer(tmp_path / "bad.tiktoken")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot read .*bad.json.* as a tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
