"""Files: outputs written whole (to a temporary sibling, renamed into place when complete), and checksums.

An output never replaces what it was not: a file never replaces a folder (nor a folder a file), and nothing is
written under a path that is not a folder; records and metrics are finite, metrics strict JSON. Each refusal is one
error naming the path, and leaves whatever stood there untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf.errors import InputError, StageError


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _clear_leftovers(final: Path) -> None:
    # A killed run leaves its temporaries behind; they are never valid output. A live process's are its own.
    for stale in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = stale.name.rpartition("-")
        if kind.endswith((".tmp", ".old")) and not _alive(pid):
            _remove(stale)


def check_parent(final: Path) -> None:
    """An InputError when something on the way to `final` is not a folder (a file, a dangling link)."""
    for parent in Path(final).parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise InputError(f"{final}: {parent} is not a folder, so nothing can be written under it")


def check_file_output(path: Path) -> None:
    """Before any work: an InputError when the file output `path` would replace a folder or has no folder to go in."""
    check_parent(path)
    if Path(path).is_dir():
        raise InputError(f"{path} is a folder; a file output never replaces a folder (name a file, in it or elsewhere)")


def _kind(path: Path) -> str:
    return "folder" if path.is_dir() else "file"


def _replace(tmp: Path, final: Path) -> None:
    if final.is_dir() and not final.is_symlink():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def staged(*finals: Path) -> Iterator[list[Path]]:
    """Yield one temporary path per final path (file or directory).

    If the block finishes, each temporary replaces its final path; if it raises, the
    temporaries are deleted and whatever stood at the final paths is left untouched. A StageError's
    message names the final paths, never the temporaries the user has not heard of.
    """
    finals_ = [Path(f) for f in finals]
    for final in finals_:
        check_parent(final)
    tmps = []
    for final in finals_:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(final)
        tmps.append(_tmp_sibling(final))
    try:
        yield tmps
        for tmp, final in zip(tmps, finals_):  # every output checked before the first one replaces anything
            if not tmp.exists():
                raise RuntimeError(f"staged output {final} was never written")
            if final.exists() and _kind(tmp) != _kind(final):
                raise InputError(f"{final} is a {_kind(final)}; a {_kind(tmp)} output never replaces a {_kind(final)}")
    except BaseException as exc:
        for tmp in tmps:
            _remove(tmp)
        if isinstance(exc, StageError):
            message = str(exc)
            for tmp, final in zip(tmps, finals_):
                message = message.replace(str(tmp), str(final))
            raise type(exc)(message) from None
        raise
    for tmp, final in zip(tmps, finals_):
        _replace(tmp, final)


def write_bytes(path: Path, data: bytes) -> None:
    with staged(Path(path)) as (tmp,):
        tmp.write_bytes(data)


def _non_finite(obj: object, key: str = "") -> str | None:
    """The key (a.b[2]) of the first NaN or infinity in obj, if any."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{key or 'the value'} is {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        if found := _non_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else str(k)):
            return found
    return None


def write_json(path: Path, obj: object) -> None:
    """Strict JSON (no NaN or Infinity, which JSON does not have): a non-finite number is a StageError, not a file."""
    if found := _non_finite(obj):
        raise StageError(f"{path}: {found}; JSON holds finite numbers only, so nothing was written")
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode("utf-8"))


def check_finite(path: Path | str, positions: np.ndarray, **columns: np.ndarray) -> None:
    """A StageError naming `path` and the first position where a record column is NaN or infinite: such records
    are never written (inside `staged`, the last good ones stay)."""
    first = {name: int(np.argmin(np.isfinite(v))) for name, v in columns.items() if not np.isfinite(v).all()}
    if first:
        name = min(first, key=first.get)
        i = first[name]
        raise StageError(f"{path}: the record of position {int(positions[i])} has {name} {columns[name][i]}; records must be finite, "
                         "so the last good ones stay")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
