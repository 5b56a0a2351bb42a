"""Per-document records from tokens: BPB byte count and a hash (no pyarrow: encode workers import it).

The hash is the first 8 bytes (little-endian uint64) of BLAKE2b over the document's tokens
([BOS] + ids) as little-endian uint16, so it can be computed from any shard, whoever wrote it.
hash_text hashes text the same way, over its UTF-8 bytes (the CaseOps originals' norm_hash).
"""
from __future__ import annotations

import hashlib

import numpy as np



def hash_doc(tokens: np.ndarray) -> int:
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<u2").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_text(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def doc_records(tokens: np.ndarray, starts: np.ndarray, per_position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte counts and hashes of the documents tokens[starts[i]:starts[i+1]] (last runs to the end), from
    the bytes of each target by position (pgolf.bpb.position_bytes).

    A document's bytes are those of its targets tokens[s+1:e]; summed over a split they equal the split's
    BPB byte count, because BOS targets count 0 bytes.
    """
    tokens = np.asarray(tokens)
    per_target = np.asarray(per_position).astype(np.int64)
    per_target[starts] = 0  # a document's first token is no target of its own
    nbytes = np.add.reduceat(per_target, starts) if len(starts) else np.zeros(0, np.int64)
    ends = np.append(starts[1:], len(tokens))
    hashes = np.fromiter((hash_doc(tokens[s:e]) for s, e in zip(starts, ends)), dtype=np.uint64, count=len(starts))
    return nbytes, hashes
