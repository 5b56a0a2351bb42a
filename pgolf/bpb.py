"""Bits per byte: the byte tables, the byte sidecar and the formula, as the challenge defines them. Every
stage uses this.

A scored target y after input x counts base_bytes[y] + (leading_space[y] and not boundary[x])
bytes: the UTF-8 length of y's piece without its "▁", plus one for the "▁" unless x is a
boundary (control/unknown/unused) token such as BOS. Byte-fallback pieces count 1; control and
unknown pieces count 0. BPB = sum NLL (nats) / (ln 2 * sum bytes).

Under a text transform (CaseOps) the pieces spell the transformed text, so the tables would count its
bytes; the validation split then carries a byte sidecar (fineweb_val_bytes_*.bin, pgolf/shards.py)
giving each token the UTF-8 bytes of the original text it stands for, and every BPB reads that instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

SPACE = "\u2581"  # SentencePiece's word-boundary mark "▁"


@dataclass(frozen=True)
class ByteTables:
    base_bytes: np.ndarray  # int16 [V]
    leading_space: np.ndarray  # bool [V]
    boundary: np.ndarray  # bool [V]

    @classmethod
    def from_sentencepiece(cls, sp: spm.SentencePieceProcessor | Path | str, vocab_size: int = 0) -> "ByteTables":
        """Tables for a tokenizer; `vocab_size` pads them for a model with a larger embedding."""
        if not isinstance(sp, spm.SentencePieceProcessor):
            sp = spm.SentencePieceProcessor(model_file=str(sp))
        n = max(sp.vocab_size(), vocab_size)
        base = np.zeros(n, dtype=np.int16)
        space = np.zeros(n, dtype=bool)
        boundary = np.ones(n, dtype=bool)  # ids past the tokenizer's vocabulary act like control ids
        for i in range(sp.vocab_size()):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE):
                space[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
        return cls(base, space, boundary)

    def target_bytes(self, prev: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Bytes of each target given the token before it (int32, same shape)."""
        prev, target = np.asarray(prev), np.asarray(target)
        extra = self.leading_space[target] & ~self.boundary[prev]
        return self.base_bytes[target].astype(np.int32) + extra

    def stream_bytes(self, tokens: np.ndarray) -> int:
        """Total bytes of the targets tokens[1:] of a contiguous stream (a document or a split)."""
        tokens = np.asarray(tokens)
        if tokens.size < 2:
            return 0
        return int(self.target_bytes(tokens[:-1], tokens[1:]).sum(dtype=np.int64))


def position_bytes(tokens: np.ndarray, tables: ByteTables, sidecar: np.ndarray | None = None) -> np.ndarray:
    """Bytes of each target of a stream by position (int32; [t] for target t = 1..N, [0] = 0): the sidecar's
    where the split has one, else the tables'."""
    if sidecar is not None:
        if len(sidecar) != len(tokens):
            raise ValueError(f"a byte sidecar of {len(sidecar)} counts for {len(tokens)} tokens")
        out = np.asarray(sidecar).astype(np.int32)
        out[:1] = 0
        return out
    out = np.zeros(len(tokens), dtype=np.int32)
    if len(tokens) > 1:
        out[1:] = tables.target_bytes(tokens[:-1], tokens[1:])
    return out


def val_position_bytes(shards_dir: Path, tokens: np.ndarray, tables: ByteTables) -> np.ndarray:
    """position_bytes of the validation split, with its byte sidecar when the shard folder holds one."""
    from pgolf.shards import read_sidecar  # shards' readers stay free of the byte rule

    return position_bytes(tokens, tables, read_sidecar(shards_dir))


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """The challenge metric from a summed NLL in nats and the bytes of the same targets."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return nll_nats / (math.log(2) * n_bytes)
