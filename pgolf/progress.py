"""A progress line with rate and ETA at most every few seconds, and a one-line summary at the end."""
from __future__ import annotations

import sys
import time


def _fmt(n: float, unit: str) -> str:
    if unit == "B":
        for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if n >= scale:
                return f"{n / scale:.1f} {suffix}"
        return f"{n:.0f} B"
    return f"{n:.2f} {unit}" if n < 10 and n != int(n) else f"{n:,.0f} {unit}"  # slow rates: not "0 items/s"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, what: str, total: float = 0, unit: str = "items", every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.count = 0.0
        self.start = self.last = self.mark = time.monotonic()
        self.laps: dict[str, float] = {}  # seconds of each step named by update(what=...), since the one before

    def update(self, n: float = 1, count: float | None = None, what: str = "") -> None:
        """Add n, or set the running count; log (naming `what` was just done) if `every` seconds have passed."""
        self.count = count if count is not None else self.count + n
        now = time.monotonic()
        if what:
            self.laps[what], self.mark = round(now - self.mark, 2), now
        if now - self.last >= self.every:
            self.last = now
            self._log(now, what)

    def _log(self, now: float, what: str = "") -> None:
        rate = self.count / max(now - self.start, 1e-9)
        line = f"{self.what}: {what + ', ' if what else ''}{_fmt(self.count, self.unit)}"
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            line += f" / {_fmt(self.total, self.unit)} ({100 * self.count / self.total:.0f}%)"
            line += f", ETA {_clock(eta) if eta != float('inf') else '?'}"
        print(f"{line}, {_fmt(rate, self.unit)}/s", file=sys.stderr, flush=True)

    def done(self, summary: str = "") -> float:
        """Print the one-line summary; return elapsed seconds."""
        elapsed = time.monotonic() - self.start
        rate = self.count / max(elapsed, 1e-9)
        line = f"{self.what}: {_fmt(self.count, self.unit)} in {elapsed:.1f}s ({_fmt(rate, self.unit)}/s)"
        print(line + (f"; {summary}" if summary else ""), file=sys.stderr, flush=True)
        return elapsed
