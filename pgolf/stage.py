"""How a stage process runs: alone, ending with the process that started it, failing in one line.

Every stage's entry point is `run_stage(main, name)`:
- one run of a stage at a time: a second one (a direct `python -m stages.X` beside `dvc repro`, say)
  is refused before it touches anything, naming the process that holds the stage;
- the stage ends when its parent does (`kill -9` of `dvc repro` must not leave training running on
  its own): on Linux the kernel sends SIGTERM, which unwinds like Ctrl-C, removing temporaries;
- a StageError prints `error: <message>` alone and exits with status 2;
- Ctrl-C unwinds the same way (temporaries removed, outputs kept) and ends in one line, status 130.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from typing import Callable

from pgolf.errors import StageError
from pgolf.layout import LOCKS

PR_SET_PDEATHSIG = 1
_held: list[int] = []  # the lock's file descriptor, open for the life of the process


def in_torchrun_worker() -> bool:
    """True in the processes torchrun starts: the process that launched them holds the stage."""
    return "RANK" in os.environ


def hold(name: str) -> None:
    """Take the stage's lock (released by the kernel when the process ends, however it ends)."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    path = LOCKS / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StageError(f"{path}: stage {name} is already running (pid {holder}); wait for it or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held.append(fd)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `staged` blocks, so no temporary is left behind


def end_with_parent() -> None:
    """SIGTERM this process when its parent dies, and turn SIGTERM into an orderly exit."""
    signal.signal(signal.SIGTERM, _terminated)
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def run_stage(main: Callable[[], None], name: str) -> None:
    """Run stage `name`'s main alone and tied to its parent; a StageError ends it in one line, exit 2; Ctrl-C in one line, 130."""
    try:
        if not in_torchrun_worker():
            hold(name)
        end_with_parent()
        main()
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the traceback would run 35 lines down into torch; `staged` blocks have unwound already
        print(f"{name}: interrupted (Ctrl-C); the last good outputs are kept", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
