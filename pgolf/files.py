"""Files: outputs written whole (to a temporary sibling, renamed into place when complete), and checksums."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from pgolf.errors import StageError


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
    tmps = []
    for final in finals_:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(final)
        tmps.append(_tmp_sibling(final))
    try:
        yield tmps
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
        if not tmp.exists():
            raise RuntimeError(f"staged output {final} was never written")
    for tmp, final in zip(tmps, finals_):
        _replace(tmp, final)


def write_bytes(path: Path, data: bytes) -> None:
    with staged(Path(path)) as (tmp,):
        tmp.write_bytes(data)


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
