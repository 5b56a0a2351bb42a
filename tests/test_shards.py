import hashlib

import numpy as np
import pytest

from pgolf import shards
from pgolf.errors import InputError


def test_roundtrip_and_exact_header(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 1023], dtype=np.uint16)
    path = tmp_path / "fineweb_val_000000.bin"
    shards.write_shard(path, tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert raw[1024:] == tokens.astype("<u2").tobytes()
    assert shards.read_tokens(path).tolist() == tokens.tolist()


def test_writer_straddles_shards_and_hashes_them(tmp_path):
    w = shards.ShardWriter(tmp_path, "train", shard_tokens=4)
    w.add(np.arange(3, dtype=np.uint16))
    w.add(np.arange(3, 9, dtype=np.uint16))
    written = w.close()
    assert [s["name"] for s in written] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    assert [s["tokens"] for s in written] == [4, 4, 1]
    got = np.concatenate([shards.read_tokens(tmp_path / s["name"]) for s in written])
    assert got.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    for s in written:
        assert s["sha256"] == hashlib.sha256((tmp_path / s["name"]).read_bytes()).hexdigest()
    assert shards.list_shards(tmp_path, "train") == [tmp_path / s["name"] for s in written]


def _header(magic=20240520, version=1, n=3):
    h = np.zeros(256, dtype="<i4")
    h[:3] = magic, version, n
    return h.tobytes()


@pytest.mark.parametrize(
    "raw, message",
    [
        (_header(magic=1234) + b"\0" * 6, "magic 1234"),
        (_header(version=2) + b"\0" * 6, "version 2"),
        (_header(n=3) + b"\0" * 4, "header says 3 tokens"),
        (_header(n=3) + b"\0" * 8, "header says 3 tokens"),
        (b"\0" * 100, "truncated shard"),
    ],
)
def test_bad_shards_are_refused_by_name(tmp_path, raw, message):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(raw)
    with pytest.raises(InputError, match=message) as err:
        shards.read_tokens(path)
    assert str(path) in str(err.value)


def test_gap_in_numbering_is_refused(tmp_path):
    for i in (0, 2):
        shards.write_shard(tmp_path / shards.shard_name("train", i), np.zeros(2, np.uint16))
    with pytest.raises(InputError, match="fineweb_train_000002.bin"):
        shards.list_shards(tmp_path, "train")


def test_vocab_check_names_shard_and_tokenizer(tmp_path):
    with pytest.raises(InputError, match=r"x\.bin: token id 1024 .*tok\.model \(1024 tokens\)"):
        shards.check_vocab(np.array([3, 1024], np.uint16), 1024, tmp_path / "x.bin", "tok.model")
    shards.check_vocab(np.array([3, 1023], np.uint16), 1024, tmp_path / "x.bin", "tok.model")
