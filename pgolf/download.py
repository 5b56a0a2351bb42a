"""Fetch a document file named by URL (e.g. the challenge's docs_selected.jsonl) into a local cache.

Only runs when a param names a URL; the default pipeline never touches the network.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pgolf.files import staged
from pgolf.errors import InputError
from pgolf.progress import Progress

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


