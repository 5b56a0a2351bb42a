"""Build the challenge dataset: shards + per-document index, from documents or from existing shards.

Validation is the first `val_docs` documents in source order; the rest is training. Each document
is [BOS] + encode(text), no EOS, and documents run on across shard boundaries as in the official
exporter, so its shards come out byte for byte.
"""
from __future__ import annotations

import dataclasses

import os
import shutil
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf import caseops, shards, tokenizer
from pgolf.bpb import ByteTables, position_bytes
from pgolf.doc_index import DocIndexWriter
from pgolf.doc_records import doc_records
from pgolf.documents import DocReader
from pgolf.encode import batched, encode_batches
from pgolf.errors import InputError
from pgolf.files import sha256_file
from pgolf.progress import Progress


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: str  # builtin | docs | shards
    docs: str | list[str] | None  # docs: files, folders, globs or URLs (.jsonl, .parquet, .txt)
    shards: str | None  # shards: a folder holding fineweb_{train,val}_*.bin
    val_docs: int | None  # validation = the first val_docs documents (null: all of them, shards only)
    shard_tokens: int  # tokens per shard file
    workers: int  # encoding processes; 0 = one per core
    download_dir: str  # where URLs in data.docs are downloaded to

    def __post_init__(self) -> None:
        sources = ("builtin", "docs", "shards")
        if self.source not in sources:
            raise InputError(f"params.yaml: data.source is {self.source!r}; use one of {', '.join(sources)}")
        if self.source == "docs" and not self.docs:
            raise InputError("params.yaml: data.source is 'docs' but data.docs is empty")
        if self.source == "shards" and not self.shards:
            raise InputError("params.yaml: data.source is 'shards' but data.shards is empty")
        if self.source != "shards" and (self.val_docs is None or self.val_docs < 1):
            raise InputError("params.yaml: data.val_docs must be a positive document count")
        if self.shard_tokens < 1:
            raise InputError("params.yaml: data.shard_tokens must be positive")
        if self.workers < 0:
            raise InputError("params.yaml: data.workers must be 0 (all cores) or more")


ROUNDTRIP_DOCS = 8  # validation documents re-encoded to check that a tokenizer fits its shards


class _Split:
    """Running totals and index records of one split."""

    def __init__(self, name: str, index: DocIndexWriter):
        self.name, self.index = name, index
        self.docs = self.tokens = self.bytes = 0
        self.shards: list[dict] = []

    def record(self, lengths: np.ndarray, nbytes: np.ndarray, hashes: np.ndarray,
               norm_hashes: np.ndarray | None = None, normalised: np.ndarray | None = None) -> None:
        self.index.add(self.name, lengths, nbytes, hashes, norm_hashes, normalised)
        self.docs += len(lengths)
        self.tokens += int(lengths.sum())
        self.bytes += int(nbytes.sum())

    def summary(self) -> dict:
        return {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


def export_docs(
    reader: DocReader,
    model: Path,
    out_dir: Path,
    index_path: Path,
    val_docs: int,
    shard_tokens: int,
    workers: int = 0,
    transform: str = "none",
) -> dict[str, dict]:
    """Encode the reader's documents into shards under out_dir and their records into index_path; with
    transform caseops, the validation byte sidecar beside the validation shards.

    Returns per split: docs, tokens, bytes (BPB byte count) and the shards written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress("tokenize", total=reader.total_bytes, unit="B")
    index = DocIndexWriter(index_path)
    splits = {name: _Split(name, index) for name in shards.SPLITS}
    writers = {name: shards.ShardWriter(out_dir, name, shard_tokens) for name in (*shards.SPLITS, shards.SIDECAR)}
    try:
        for enc in encode_batches(model, batched(reader), workers, transform):
            val, train = enc.split(max(0, val_docs - splits["val"].docs))
            for name, part in (("val", val), ("train", train)):
                if len(part.lengths):
                    writers[name].add(part.tokens)
                    splits[name].record(part.lengths, part.nbytes, part.hashes, part.norm_hashes, part.normalised)
            if val.sidecar is not None and len(val.lengths):
                writers[shards.SIDECAR].add(val.sidecar)  # the same counts as val's tokens: the same shard edges
            if splits["train"].docs:
                writers["val"].close()  # validation is complete: write its last shard now
                writers[shards.SIDECAR].close()
            progress.update(count=reader.bytes_read)
    finally:
        index.close()
    for name in shards.SPLITS:
        splits[name].shards = writers[name].close()
    writers[shards.SIDECAR].close()
    if splits["val"].docs < val_docs:
        files = ", ".join(str(f.path) for f in reader.files)
        raise InputError(f"data.val_docs is {val_docs} but {files} holds only {splits['val'].docs} documents")
    progress.done(f"{splits['val'].docs:,} val + {splits['train'].docs:,} train documents")
    return {name: s.summary() for name, s in splits.items()}


def export_reference(texts: list[str], sp: spm.SentencePieceProcessor, out_dir: Path, val_docs: int, shard_tokens: int,
                     transform: str = "none") -> None:
    """The plain definition of export_docs' shards: what the fast path must reproduce byte for byte."""
    texts = [caseops.encode(text) for text in texts] if transform == "caseops" else texts
    docs = [[sp.bos_id()] + sp.encode(text) for text in texts]
    for split, part in (("val", docs[:val_docs]), ("train", docs[val_docs:])):
        stream = np.array([t for doc in part for t in doc], dtype="<u2")
        for i, start in enumerate(range(0, len(stream), shard_tokens)):
            shards.write_shard(out_dir / shards.shard_name(split, i), stream[start : start + shard_tokens])


def import_shards(folder: Path, model: Path, out_dir: Path, index_path: Path, transform: str = "none") -> dict[str, dict]:
    """Validate existing challenge shards against their tokenizer and link them into out_dir unchanged, with
    the validation byte sidecar where there is one (required with transform caseops): it must run beside
    the validation shards and give every document the bytes its tokens decode to."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data.shards: {folder}: no such folder")
    sp = tokenizer.load(model)
    tables = ByteTables.from_sentencepiece(sp)
    bos = sp.bos_id()
    ops = caseops.operator_ids(sp, str(model)) if transform == "caseops" else None
    sidecar = shards.read_sidecar(folder)
    if ops is not None and sidecar is None:
        raise InputError(f"{folder}: tokenizer.transform is caseops but there is no validation byte sidecar "
                         f"({shards.shard_name(shards.SIDECAR, 0)}, ...): BPB must count the original text's bytes")
    out_dir.mkdir(parents=True, exist_ok=True)
    index = DocIndexWriter(index_path)
    splits = {name: _Split(name, index) for name in shards.SPLITS}
    try:
        for name, split in splits.items():
            paths = shards.list_shards(folder, name)
            if name == "val" and not paths:
                raise InputError(f"{folder}: no validation shards (fineweb_val_000000.bin, ...)")
            progress = Progress(f"check {name} shards", total=len(paths), unit="shards")
            carry = np.zeros(0, dtype="<u2")  # the document still running at the end of the last shard
            side = sidecar if name == "val" else None
            for i, path in enumerate(paths):
                tokens = shards.read_tokens(path)
                shards.check_vocab(tokens, sp.vocab_size(), path, model)
                if i == 0 and (len(tokens) == 0 or tokens[0] != bos):
                    raise InputError(f"{path}: the first shard of a split must start with BOS ({bos})")
                if name == "val" and i == 0:
                    _check_roundtrip(sp, tokens, path, model)
                stream = np.concatenate([carry, tokens])
                starts = np.flatnonzero(stream == bos)  # stream[0] is a BOS: the carry starts with one
                end = len(stream) if i == len(paths) - 1 else int(starts[-1])
                done = starts[starts < end]
                first = split.tokens  # where stream[0] is in the split: every token before it is a recorded document's
                if len(done):
                    per_position = position_bytes(stream[:end], tables) if ops is None else caseops.position_bytes(stream[:end], tables, ops)
                    nbytes, hashes = doc_records(stream[:end], done, per_position)
                    if side is not None:
                        _check_sidecar(side, first, done, end, nbytes, folder, split.docs)
                        nbytes, _ = doc_records(stream[:end], done, side[first : first + end])
                    split.record(np.diff(np.append(done, end)), nbytes, hashes)
                carry = stream[end:]
                split.shards.append({"name": path.name, "tokens": len(tokens), "sha256": _link(path, out_dir / path.name)})
                progress.update()
            progress.done(f"{split.docs:,} documents, {split.tokens:,} tokens")
        for path in shards.list_shards(folder, shards.SIDECAR) if sidecar is not None else ():
            _link(path, out_dir / path.name)
    finally:
        index.close()
    return {name: s.summary() for name, s in splits.items()}


def _check_sidecar(side: np.ndarray, first: int, done: np.ndarray, end: int, nbytes: np.ndarray, folder: Path, docs_before: int) -> None:
    """Each document's sidecar bytes must be the bytes its tokens decode to."""
    counts = side[first : first + end].astype(np.int64)
    counts[done] = 0
    got = np.add.reduceat(counts, done)
    if (bad := np.flatnonzero(got != nbytes)).size:
        d = int(bad[0])
        raise InputError(f"{folder}: the byte sidecar gives validation document {docs_before + d} {int(got[d]):,} bytes, but its tokens "
                         f"decode to {int(nbytes[d]):,} ({bad.size} of {len(done)} documents disagree in this shard)")


def _check_roundtrip(sp: spm.SentencePieceProcessor, tokens: np.ndarray, path: Path, model: Path) -> None:
    # Ids below the vocabulary size prove little (sp1024 shards fit any larger vocabulary); a
    # tokenizer that made these shards re-encodes its own decoded text to the same ids.
    starts = np.flatnonzero(tokens == sp.bos_id())[: ROUNDTRIP_DOCS + 1]
    docs = [tokens[s + 1 : e].tolist() for s, e in zip(starts, np.append(starts[1:], len(tokens)))][:ROUNDTRIP_DOCS]
    same = sum(sp.encode(sp.decode(doc)) == doc for doc in docs)
    if 2 * same < len(docs):
        raise InputError(
            f"{path}: only {same} of the first {len(docs)} documents re-encode to the same ids with {model}: "
            "these shards were made with another tokenizer"
        )


def _link(src: Path, dst: Path) -> str:
    """Hard-link (copy across file systems) a shard into place; return its sha256."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return sha256_file(dst)
