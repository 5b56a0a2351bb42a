"""The document index, data/docs.parquet: per document its split, index, tokens, bytes and hash, and with the
CaseOps transform on documents read as text, norm_hash and normalised (null where there is no text: imported
shards; an index written before them has no such columns).

The report stage compares train and validation hashes to prove the splits are disjoint, and each decoded
validation document's inverse with its norm_hash (transform_inverts).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


SCHEMA = pa.schema(
    [
        ("split", pa.dictionary(pa.int8(), pa.string())),
        ("doc", pa.int64()),  # index within the split
        ("tokens", pa.int64()),  # including BOS
        ("bytes", pa.int64()),  # BPB bytes of its targets (what the challenge divides by)
        ("hash", pa.uint64()),
        ("norm_hash", pa.uint64()),  # pgolf.doc_records.hash_text of the original as the tokenizer normalises it; null: no text
        ("normalised", pa.bool_()),  # that normalisation changed the original; null: no text
    ]
)
ROW_GROUP = 1 << 16


class DocIndexWriter:
    """Streams records to parquet in row groups; memory does not grow with the corpus."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(str(path), SCHEMA, compression="zstd")
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0
        self.counts = {}

    def add(self, split: str, tokens: np.ndarray, nbytes: np.ndarray, hashes: np.ndarray,
            norm_hashes: np.ndarray | None = None, normalised: np.ndarray | None = None) -> None:
        first = self.counts.get(split, 0)
        self.counts[split] = first + len(tokens)
        self.pending.append(
            pa.record_batch(
                [
                    pa.DictionaryArray.from_arrays(np.zeros(len(tokens), np.int8), [split]),
                    pa.array(np.arange(first, first + len(tokens), dtype=np.int64)),
                    pa.array(np.asarray(tokens, dtype=np.int64)),
                    pa.array(np.asarray(nbytes, dtype=np.int64)),
                    pa.array(np.asarray(hashes, dtype=np.uint64)),
                    pa.nulls(len(tokens), pa.uint64()) if norm_hashes is None else pa.array(np.asarray(norm_hashes, dtype=np.uint64)),
                    pa.nulls(len(tokens), pa.bool_()) if normalised is None else pa.array(np.asarray(normalised, dtype=bool)),
                ],
                schema=SCHEMA,
            )
        )
        self.rows += len(tokens)
        if self.rows >= ROW_GROUP:
            self._flush()

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending).unify_dictionaries())
        self.pending, self.rows = [], 0


def read_hashes(path: Path, split: str) -> np.ndarray:
    """The document hashes of one split."""
    table = pq.read_table(str(path), columns=["split", "hash"])
    mask = np.asarray(table.column("split").cast(pa.string()).to_numpy(zero_copy_only=False) == split)
    return table.column("hash").to_numpy()[mask]
