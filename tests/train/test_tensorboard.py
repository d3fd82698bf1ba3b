"""The TensorFlow-free TensorBoard writer: CRC32C test vector and a write/read round trip."""

from __future__ import annotations

import pytest

from m2rnn_jax.train.tensorboard import EventFileWriter, crc32c, read_scalars


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_event_file_round_trip(tmp_path):
    writer = EventFileWriter(tmp_path)
    writer.scalars(1, {"train/loss": 2.5, "train/lr": 1e-3})
    writer.scalars(20, {"train/loss": 0.125})
    writer.close()
    assert writer.path.name.startswith("events.out.tfevents.")
    scalars = read_scalars(writer.path)
    assert scalars[0] == (1, "train/loss", 2.5) and scalars[2] == (20, "train/loss", 0.125)
    assert scalars[1][:2] == (1, "train/lr") and scalars[1][2] == pytest.approx(1e-3)
    data = bytearray(writer.path.read_bytes())
    data[-5] ^= 0xFF  # corrupt the last record's payload
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad data CRC"):
        read_scalars(writer.path)
