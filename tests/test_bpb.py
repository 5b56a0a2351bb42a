import math

import numpy as np
import pytest
import sentencepiece as spm

from pgolf import shards
from pgolf.bpb import ByteTables, bits_per_byte
from conftest import read_jsonl_texts


@pytest.fixture(scope="module")
def sp(sp1024):
    return spm.SentencePieceProcessor(model_file=str(sp1024))


@pytest.fixture(scope="module")
def tables(sp):
    return ByteTables.from_sentencepiece(sp)


def test_piece_classes(sp, tables):
    bos, unk = sp.bos_id(), sp.unk_id()
    byte_piece = sp.piece_to_id("<0xE2>")
    assert sp.is_byte(byte_piece)
    assert (tables.base_bytes[byte_piece], tables.boundary[byte_piece]) == (1, False)
    for control in (bos, unk, sp.pad_id(), sp.eos_id()):
        assert tables.base_bytes[control] == 0 and tables.boundary[control] and not tables.leading_space[control]
    the = sp.piece_to_id("\u2581the")
    assert (tables.base_bytes[the], tables.leading_space[the]) == (3, True)


def test_leading_space_counts_except_after_a_boundary(sp, tables):
    the, word = sp.piece_to_id("\u2581the"), sp.piece_to_id("\u2581of")
    got = tables.target_bytes(np.array([sp.bos_id(), the]), np.array([the, word]))
    assert got.tolist() == [3, 3]  # after BOS "▁the" is 3 bytes; after "the", "▁of" is 1 + 2


def test_tables_pad_to_a_larger_model_vocabulary(sp):
    t = ByteTables.from_sentencepiece(sp, vocab_size=1100)
    assert len(t.base_bytes) == 1100 and t.boundary[1024:].all() and not t.base_bytes[1024:].any()


def test_official_val_head_byte_count(fineweb, tables):
    """The challenge's byte count of the 504,572 targets equals the UTF-8 size of the 450 texts."""
    tokens = shards.read_tokens(fineweb / "val_head_sp1024.bin")
    assert len(tokens) - 1 == 504_572
    assert tables.stream_bytes(tokens) == 1_209_539
    assert sum(len(t.encode("utf-8")) for t in read_jsonl_texts(fineweb / "val_head_docs.jsonl")) == 1_209_539


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 1000, 800) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
