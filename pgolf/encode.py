"""Encode documents to [BOS] + ids in worker processes, in order, with bounded memory.

Each batch of texts becomes one `Encoded`: the concatenated tokens plus each document's length,
BPB byte count and hash (pgolf.doc_index), all computed in the worker so the parent only writes.
With the CaseOps transform each text is transformed first, and every token also gets the bytes of the
original text it stands for (the validation byte sidecar), and each document the hash of its original text as
the tokenizer normalises it, and whether normalisation changed it (what the report's transform_inverts compares).
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from pgolf import caseops
from pgolf.bpb import ByteTables, position_bytes
from pgolf.doc_records import doc_records, hash_text


@dataclass
class Encoded:
    tokens: np.ndarray  # uint16, the documents one after another, each [BOS] + ids
    lengths: np.ndarray  # int64 per document, BOS included
    nbytes: np.ndarray  # int64 per document
    hashes: np.ndarray  # uint64 per document
    sidecar: np.ndarray | None = None  # uint16 per token: its original bytes (CaseOps only)
    norm_hashes: np.ndarray | None = None  # uint64 per document: hash_text of its original as the tokenizer normalises it (CaseOps only)
    normalised: np.ndarray | None = None  # bool per document: that normalisation changed its original (CaseOps only)

    def split(self, k: int) -> tuple["Encoded", "Encoded"]:
        """The first k documents and the rest."""
        at = int(self.lengths[:k].sum())
        cut = [(None, None) if x is None else (x[:n], x[n:]) for x, n in ((self.sidecar, at), (self.norm_hashes, k), (self.normalised, k))]
        head = Encoded(self.tokens[:at], self.lengths[:k], self.nbytes[:k], self.hashes[:k], *(c[0] for c in cut))
        tail = Encoded(self.tokens[at:], self.lengths[k:], self.nbytes[k:], self.hashes[k:], *(c[1] for c in cut))
        return head, tail


def encode_batch(sp: spm.SentencePieceProcessor, tables: ByteTables, texts: list[str], ops: np.ndarray | None = None) -> Encoded:
    """`ops`: the CaseOps operator ids (pgolf.caseops.operator_ids) to transform the texts first; None: as they are."""
    norm_hashes = normalised = None
    if ops is not None:
        norm = caseops.normalizer(sp)
        wanted = [norm(text) for text in texts]
        norm_hashes = np.fromiter(map(hash_text, wanted), dtype=np.uint64, count=len(texts))
        normalised = np.array([w != text for w, text in zip(wanted, texts)], dtype=bool)
        texts = [caseops.encode(text) for text in texts]
    ids = sp.encode(texts, out_type=int, num_threads=1)  # parallelism comes from worker processes
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=int(lengths.sum()) - len(ids))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    tokens = np.insert(flat, starts - np.arange(len(ids)), np.uint16(sp.bos_id()))
    per_position = position_bytes(tokens, tables) if ops is None else caseops.position_bytes(tokens, tables, ops)
    per_position[starts] = 0  # BOS stands for no text
    nbytes, hashes = doc_records(tokens, starts, per_position)
    return Encoded(tokens, lengths, nbytes, hashes, None if ops is None else per_position.astype(np.uint16), norm_hashes, normalised)


def batched(texts: Iterable[str], max_docs: int = 512, max_chars: int = 1 << 18) -> Iterator[list[str]]:
    """Group texts into batches of at most max_docs documents or about max_chars characters."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker: tuple[spm.SentencePieceProcessor, ByteTables, np.ndarray | None] | None = None


def _init(model: str, transform: str) -> None:
    global _worker
    sp = spm.SentencePieceProcessor(model_file=model)
    _worker = (sp, ByteTables.from_sentencepiece(sp), caseops.operator_ids(sp, model) if transform == "caseops" else None)


def _encode(texts: list[str]) -> Encoded:
    sp, tables, ops = _worker
    return encode_batch(sp, tables, texts, ops)


def encode_batches(model: Path, batches: Iterable[list[str]], workers: int = 0, transform: str = "none") -> Iterator[Encoded]:
    """encode_batch over `batches` in order, on `workers` processes (0: one per core); `transform`: none | caseops.

    At most two batches per worker are in flight, so memory stays flat however long the input.
    """
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        _init(str(model), transform)
        for texts in batches:
            yield _encode(texts)
        return
    # spawn, not fork: the parent may hold threads (pyarrow, sentencepiece) that fork would copy mid-lock.
    # A ProcessPoolExecutor, not a Pool: Pool.terminate can hang while a large task is being sent.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(str(model), transform))
    try:
        pending: collections.deque = collections.deque()
        for texts in batches:
            pending.append(pool.submit(_encode, texts))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
