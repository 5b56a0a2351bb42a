"""The challenge's token shard format, byte for byte.

A shard is 256 little-endian int32 (magic 20240520, version 1, token count, zeros), then the
tokens as little-endian uint16. Shards are named fineweb_{split}_{index:06d}.bin; a document may
straddle two shards of its split. The validation byte sidecar (the records' CaseOps format) is a
"split" of its own, fineweb_val_bytes_{index:06d}.bin in the same format: one uint16 per validation
token, shard for shard, the UTF-8 bytes of the original text that token stands for (BOS 0).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from pgolf.files import staged
from pgolf.errors import InputError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("val", "train")
SIDECAR = "val_bytes"
MAX_VOCAB = 65_536  # token ids are stored as uint16
_NAME = re.compile(r"fineweb_(train|val|val_bytes)_(\d{6})\.bin")


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def header_bytes(n_tokens: int) -> bytes:
    if not 0 <= n_tokens < 2**31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, not {n_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, n_tokens)
    return header.tobytes()


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically (tests and tools; the exporter streams through ShardWriter)."""
    with staged(Path(path)) as (tmp,):
        with open(tmp, "wb") as f:
            f.write(header_bytes(len(tokens)))
            f.write(np.asarray(tokens, dtype="<u2").tobytes())


def read_tokens(path: Path) -> np.ndarray:
    """The tokens of a validated shard, memory-mapped (read-only uint16)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputError(f"{path}: truncated shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise InputError(f"{path}: not a challenge shard: magic {magic}, expected {MAGIC}")
    if version != VERSION:
        raise InputError(f"{path}: unsupported shard version {version}, expected {VERSION}")
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise InputError(
            f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def list_shards(folder: Path, split: str) -> list[Path]:
    """The shards of one split, in order; refuses gaps in the numbering."""
    paths = sorted(p for p in Path(folder).glob(f"fineweb_{split}_*.bin") if (m := _NAME.fullmatch(p.name)) and m.group(1) == split)
    for i, p in enumerate(paths):
        if p.name != shard_name(split, i):
            raise InputError(f"{folder}: {split} shards are not numbered 0..{len(paths) - 1}: found {p.name}")
    return paths


def split_tokens(folder: Path, split: str) -> np.ndarray:
    """Every token of one split, in order, as one array; refuses a split with no shards."""
    paths = list_shards(folder, split)
    if not paths:
        raise InputError(f"{folder}: no {split} shards (fineweb_{split}_*.bin)")
    return np.concatenate([read_tokens(p) for p in paths])


def read_sidecar(folder: Path) -> np.ndarray | None:
    """The validation byte sidecar as one array parallel to the validation tokens, or None when the split
    has none; refuses one that does not run shard for shard beside the validation shards."""
    sides, vals = list_shards(folder, SIDECAR), list_shards(folder, "val")
    if not sides:
        return None
    if len(sides) != len(vals):
        raise InputError(f"{folder}: {len(sides)} byte sidecar shards ({shard_name(SIDECAR, 0)}, ...) for {len(vals)} validation shards")
    counts = [read_tokens(p) for p in sides]
    for path, c, v in zip(sides, counts, vals):
        if len(c) != (n := len(read_tokens(v))):
            raise InputError(f"{path}: {len(c):,} byte counts for the {n:,} tokens of {v.name}")
    return np.concatenate(counts)


def fingerprint(folder: Path, split: str, edge: int = 1 << 16) -> str:
    """A cheap identity of a split's shards: names, sizes and their first and last `edge` bytes.

    It tells one dataset from another (a resume must continue on the data it started on) without
    reading billions of tokens; tokenize's manifest holds the full sha256 of every shard.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path in list_shards(folder, split):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(edge))
            f.seek(max(size - edge, 0))
            digest.update(f.read(edge))
    return digest.hexdigest()


def check_vocab(tokens: np.ndarray, vocab_size: int, path: Path, tokenizer: Path | str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise InputError(
            f"{path}: token id {int(tokens.max())} is outside the vocabulary of {tokenizer} "
            f"({vocab_size} tokens): these shards were made with another tokenizer"
        )


class ShardWriter:
    """Streams one split's tokens into fixed-size shards; memory is one shard buffer."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = Path(folder), split, shard_tokens
        self.buf: np.ndarray | None = None  # allocated on first use, released by close()
        self.fill = 0
        self.written: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        if self.buf is None:
            self.buf = np.empty(self.shard_tokens, dtype="<u2")
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self._flush()

    def close(self) -> list[dict]:
        """Write the last partial shard; return name, token count and sha256 of each shard."""
        self._flush()
        self.buf = None
        return self.written

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = shard_name(self.split, len(self.written))
        head, body = header_bytes(self.fill), self.buf[: self.fill].tobytes()
        with open(self.folder / name, "wb") as f:
            f.write(head)
            f.write(body)
        digest = hashlib.sha256(head)
        digest.update(body)
        self.written.append({"name": name, "tokens": self.fill, "sha256": digest.hexdigest()})
        self.fill = 0
