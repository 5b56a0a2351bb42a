"""Document sources: JSON lines with a "text" field, parquet with a "text" column, plain text files, and
URLs of them (fetched once into a local cache; only when a param names one: the default never downloads).

Every document is checked on the way in: valid UTF-8 (no lone surrogates either), a string "text".
Errors name the file and, where there is one, the line or row.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from pgolf.errors import InputError
from pgolf.files import staged
from pgolf.progress import Progress

KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}
PARQUET_BATCH = 1024


@dataclass(frozen=True)
class DocFile:
    path: Path
    kind: str  # jsonl | parquet | text


def resolve(spec: str | list[str], download_dir: Path) -> list[DocFile]:
    """Expand data.docs (files, folders, globs, URLs) into an ordered list of document files."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for entry in entries:
        if urlparse(entry).scheme in ("http", "https", "file"):
            files.append(fetch(entry, Path(download_dir).expanduser()))
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in KINDS)
        elif glob.has_magic(entry):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        elif path.is_file():
            found = [path]
        else:
            raise InputError(f"data.docs: {entry}: no such file or folder")
        if not found:
            raise InputError(f"data.docs: {entry}: holds no document files ({', '.join(KINDS)})")
        files.extend(found)
    out = []
    for path in files:
        if path.suffix not in KINDS:
            raise InputError(f"{path}: unsupported document file (use {', '.join(KINDS)})")
        out.append(DocFile(path, KINDS[path.suffix]))
    return out


class DocReader:
    """Iterates the texts of document files in order. bytes_read/total_bytes measure progress."""

    def __init__(self, files: list[DocFile]):
        self.files = files
        self.total_bytes = sum(f.path.stat().st_size for f in files)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = 0
        for f in self.files:
            n = 0
            for n, text in enumerate(_READERS[f.kind](f.path, self), start=1):
                yield text
            if n == 0:
                raise InputError(f"{f.path}: holds no documents")


def _checked(text: object, where: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{where}: no \"text\" string (found {type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: text is not valid UTF-8 (lone surrogate)") from None
    return text


def _read_jsonl(path: Path, reader: DocReader) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            reader.bytes_read += len(line)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise InputError(f"{where}: not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise InputError(f"{where}: no \"text\" field")
            yield _checked(obj["text"], where)


def _read_parquet(path: Path, reader: DocReader) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise InputError(f"{path}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
    per_row = path.stat().st_size / max(1, pf.metadata.num_rows)
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=["text"]):
        column = batch.column(0)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            values = column.to_pylist()
            for i, v in enumerate(values):
                try:
                    values[i] = v if v is None else v.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"{path}: row {row + i}: text is not valid UTF-8") from None
        else:
            try:
                column.validate(full=True)
            except pa.ArrowInvalid:
                raise InputError(f"{path}: rows {row}..{row + len(column) - 1}: text is not valid UTF-8") from None
            values = column.to_pylist()
        for text in values:
            reader.bytes_read += per_row
            yield _checked(text, f"{path}: row {row}")
            row += 1


def _read_text(path: Path, reader: DocReader) -> Iterator[str]:
    data = path.read_bytes()
    reader.bytes_read += len(data)
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}


# Fetching a document file named by URL (e.g. the challenge's docs_selected.jsonl).

CHUNK = 1 << 20


def fetch(url: str, cache_dir: Path) -> Path:
    """Download `url` once into cache_dir (keyed by the URL) and return the local path."""
    name = os.path.basename(urlparse(url).path) or "download"
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    dest = Path(cache_dir) / key / name
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=60) as response, staged(dest) as (tmp,):
            total = int(response.headers.get("Content-Length") or 0)
            progress = Progress(f"download {name}", total=total, unit="B")
            with open(tmp, "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    progress.update(len(chunk))
            if total and tmp.stat().st_size != total:
                raise InputError(f"{url}: download ended early ({tmp.stat().st_size} of {total} bytes)")
            progress.done()
    except OSError as exc:  # URLError is an OSError
        raise InputError(f"{url}: download failed ({exc})") from None
    return dest


