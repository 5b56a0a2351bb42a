"""Document sources: JSON lines with a "text" field, parquet with a "text" column, plain text files.

Every document is checked on the way in: valid UTF-8 (no lone surrogates either), a string "text".
Errors name the file and, where there is one, the line or row.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from pgolf.download import fetch
from pgolf.errors import InputError

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
