"""Data: group tables, running products, determinism and per-process slicing, packed token files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from m2rnn_jax.data.sources import make_source
from m2rnn_jax.data.state_tracking import GROUPS, get_group, running_products, state_tracking_batch
from m2rnn_jax.data.token_file import TokenWindows, open_tokens
from m2rnn_jax.train.config import DataConfig


@pytest.mark.parametrize("name, order", [("parity", 2), ("s3", 6), ("s5", 120), ("a5", 60)])
def test_groups_are_groups(name, order):
    group = get_group(name)
    table = group.table
    assert table.shape == (order, order)
    # identity, every row and column a permutation (inverses exist), associativity on random triples
    np.testing.assert_array_equal(table[group.identity], np.arange(order))
    np.testing.assert_array_equal(table[:, group.identity], np.arange(order))
    assert all(sorted(row) == list(range(order)) for row in table)
    assert all(sorted(col) == list(range(order)) for col in table.T)
    rng = np.random.default_rng(0)
    a, b, c = rng.integers(0, order, size=(3, 500))
    np.testing.assert_array_equal(table[table[a, b], c], table[a, table[b, c]])


def test_s3_is_not_abelian_and_a5_has_no_odd_permutations():
    s3 = get_group("s3").table
    assert any(s3[a, b] != s3[b, a] for a, b in itertools.product(range(6), repeat=2))
    assert get_group("a5").order * 2 == get_group("s5").order


def test_running_products_fold_the_prefix():
    group = get_group("s3")
    tokens = np.random.default_rng(1).integers(0, 6, size=(4, 9)).astype(np.int32)
    out = running_products(group, tokens)
    for row in range(4):
        product = group.identity
        for t in range(9):
            product = group.table[product, tokens[row, t]]
            assert out[row, t] == product


def test_parity_targets_are_prefix_xor():
    batch = state_tracking_batch(get_group("parity"), seed=3, step=5, batch_size=4, seq_len=12)
    np.testing.assert_array_equal(batch["targets"], np.cumsum(batch["inputs"], axis=1) % 2)


@pytest.mark.parametrize("group", GROUPS)
def test_batches_are_a_pure_function_of_seed_and_step(group):
    g = get_group(group)
    a = state_tracking_batch(g, seed=7, step=11, batch_size=8, seq_len=5)
    b = state_tracking_batch(g, seed=7, step=11, batch_size=8, seq_len=5)
    c = state_tracking_batch(g, seed=7, step=12, batch_size=8, seq_len=5)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
    rows = state_tracking_batch(g, seed=7, step=11, batch_size=8, seq_len=5, rows=slice(2, 6))
    np.testing.assert_array_equal(rows["inputs"], a["inputs"][2:6])
    np.testing.assert_array_equal(rows["targets"], a["targets"][2:6])


def test_eval_data_never_repeats_training_data():
    source = make_source(DataConfig(group="s5", seq_len=16), vocab_size=120)
    train = source.train_batch(0, 16, 32, slice(0, 32))["inputs"]
    evaluation = source.eval_batch(0, 16, 32, slice(0, 32))["inputs"]
    assert not {tuple(r) for r in train} & {tuple(r) for r in evaluation}


def test_loss_positions_last_masks_every_training_position_but_the_final_one():
    everywhere = make_source(DataConfig(group="a5", seq_len=6), vocab_size=60)
    last = make_source(DataConfig(group="a5", seq_len=6, loss_positions="last"), vocab_size=60)
    batch, plain = last.train_batch(3, 6, 4, slice(1, 3)), everywhere.train_batch(3, 6, 4, slice(1, 3))
    assert "loss_mask" not in plain
    np.testing.assert_array_equal(batch["inputs"], plain["inputs"])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 0, 0, 1]] * 2)
    assert "loss_mask" not in last.eval_batch(0, 6, 4, slice(0, 4))  # evaluation scores every position


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"loss_positions": "first"}, "data.loss_positions: expected one of"),
        ({"kind": "random_tokens", "loss_positions": "last"}, "unless data.kind=state_tracking"),
    ],
)
def test_loss_positions_is_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields)


@pytest.mark.parametrize("suffix, dtype", [(".bin", "uint16"), (".bin", "uint32"), (".npy", "uint32")])
def test_token_file_windows_and_epoch_shuffle(tmp_path, suffix, dtype):
    tokens = np.arange(1, 4 * 10 + 2, dtype=dtype)  # 41 tokens -> 10 windows of 4 + 1
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    mapped = open_tokens(path, dtype)
    windows = TokenWindows(mapped, seq_len=4)
    assert windows.num_windows == 10
    first = windows.windows(np.array([0, 3]))
    np.testing.assert_array_equal(first["inputs"], [[1, 2, 3, 4], [13, 14, 15, 16]])
    np.testing.assert_array_equal(first["targets"], [[2, 3, 4, 5], [14, 15, 16, 17]])
    epoch = windows.shuffled(seed=0, first_sample=0, count=10)["inputs"][:, 0]
    assert sorted(epoch) == [1 + 4 * i for i in range(10)]  # each window exactly once per epoch
    # A restart at any sample (or a process reading only its rows) sees the same stream.
    both = windows.shuffled(seed=0, first_sample=7, count=6)["inputs"]
    np.testing.assert_array_equal(both[:3], windows.shuffled(seed=0, first_sample=7, count=3)["inputs"])
    np.testing.assert_array_equal(both[3:], windows.shuffled(seed=0, first_sample=10, count=3)["inputs"])


def test_token_file_source_holds_out_eval_tokens_and_masks_documents(tmp_path):
    tokens = np.random.default_rng(0).integers(1, 50, size=2000).astype(np.uint16)
    tokens[::7] = 0  # EOS
    path = tmp_path / "data.bin"
    tokens.tofile(path)
    config = DataConfig(
        kind="token_file", path=str(path), seq_len=16, eval_fraction=0.1, mask_documents=True, eos_token_id=0
    )
    source = make_source(config, vocab_size=64)
    batch = source.train_batch(3, 16, 8, slice(0, 8))
    assert batch["inputs"].shape == batch["targets"].shape == batch["segment_ids"].shape == (8, 16)
    ids = batch["segment_ids"]
    assert np.all(np.diff(ids, axis=1) >= 0)
    # a new segment starts right after each EOS
    eos = batch["inputs"][:, :-1] == 0
    np.testing.assert_array_equal(np.diff(ids, axis=1)[eos], 1)
    evaluation = source.eval_batch(0, 16, 4, slice(0, 4))["inputs"]
    split = int(2000 * 0.9)
    np.testing.assert_array_equal(evaluation[0], tokens[split : split + 16])


def test_token_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    path = tmp_path / "big.bin"
    np.full(100, 70, dtype=np.uint16).tofile(path)
    source = make_source(DataConfig(kind="token_file", path=str(path), seq_len=8), vocab_size=64)
    with pytest.raises(ValueError, match="token id 70 is >= model.vocab_size=64"):
        source.train_batch(0, 8, 2, slice(0, 2))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepare-data directory: 30 short documents, byte-level BPE of 300 tokens, 20% validation."""
    from m2rnn_jax.data.text import Corpus, prepare_text_data

    directory = tmp_path_factory.mktemp("prepared")
    (directory / "docs.txt").write_text("\n\n".join(f"doc {i}: {'ab cd ' * (i % 5 + 2)}é" for i in range(30)))
    meta = prepare_text_data(
        Corpus(inputs=(str(directory / "docs.txt"),), txt_documents="paragraph"),
        directory / "out",
        train_vocab_size=300,
        validation_fraction=0.2,
        progress=False,
    )
    return directory / "out", meta


def test_a_prepared_directory_trains_on_train_bin_and_evaluates_validation_bin(prepared):
    from m2rnn_jax.data.tokenizer import load_tokenizer

    directory, meta = prepared
    train = np.fromfile(directory / "train.bin", dtype=meta["dtype"])
    validation = np.fromfile(directory / "validation.bin", dtype=meta["dtype"])
    config = DataConfig(kind="token_file", path=str(directory), seq_len=8, eval_windows=5, mask_documents=True)
    source = make_source(config, vocab_size=meta["vocab_size"])
    starts = {tuple(train[s : s + 8]) for s in range(0, len(train) - 8, 8)}
    assert all(tuple(row) in starts for row in source.train_batch(0, 8, 4, slice(0, 4))["inputs"])
    assert source.num_eval_batches(8, 4) == 2  # 5 windows in batches of 4
    first, second = source.eval_batch(0, 8, 4, slice(0, 4)), source.eval_batch(1, 8, 4, slice(0, 4))
    np.testing.assert_array_equal(first["inputs"][1], validation[8:16])
    np.testing.assert_array_equal(first["loss_mask"], 1)
    np.testing.assert_array_equal(second["loss_mask"][:, 0], [1, 0, 0, 0])  # padded rows do not count
    np.testing.assert_array_equal(second["inputs"][0], validation[32:40])
    is_eos = first["inputs"] == meta["eos_token_id"]  # segment ids from the directory's EOS id
    np.testing.assert_array_equal(np.diff(first["segment_ids"], axis=1), is_eos[:, :-1])
    np.testing.assert_array_equal(source.token_bytes, load_tokenizer(directory).token_byte_lengths())
    # The whole split when it has fewer windows than data.eval_windows.
    everything = make_source(DataConfig(kind="token_file", path=str(directory), seq_len=8), meta["vocab_size"])
    assert everything.num_eval_batches(8, 4) == -(-((len(validation) - 1) // 8) // 4)


def test_a_prepared_directory_checks_the_model_vocabulary_and_its_meta(prepared, tmp_path):
    directory, meta = prepared
    with pytest.raises(
        ValueError,
        match=f"model.vocab_size: expected >= {meta['vocab_size']} "
        f"\\(the vocabulary of data.path '{directory}'\\), got 100",
    ):
        make_source(DataConfig(kind="token_file", path=str(directory), seq_len=8), vocab_size=100)
    with pytest.raises(ValueError, match="data.path: expected a token file .* without meta.json"):
        make_source(DataConfig(kind="token_file", path=str(tmp_path), seq_len=8), vocab_size=100)
    (tmp_path / "meta.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version in \\(1,\\), got 99"):
        make_source(DataConfig(kind="token_file", path=str(tmp_path), seq_len=8), vocab_size=100)


def test_data_config_checks_the_text_fields(prepared, tmp_path):
    directory, _ = prepared
    with pytest.raises(ValueError, match="data.eval_windows: expected a positive int, got 0"):
        DataConfig(eval_windows=0)
    # mask_documents needs an EOS id: given, or from a prepared directory's meta.json
    DataConfig(kind="token_file", path=str(directory), mask_documents=True)
    with pytest.raises(ValueError, match="data.mask_documents: expected kind=token_file with data.eos_token_id set"):
        DataConfig(kind="token_file", path=str(tmp_path / "tokens.bin"), mask_documents=True)
