"""Progress bars for long work (tqdm), off when disabled or when stderr is not a terminal."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")
_enabled = os.environ.get("GALAXALIGN_PROGRESS", "1") != "0"


def disable() -> None:
    global _enabled
    _enabled = False


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm bar writing to stderr; silent unless enabled and stderr is a TTY (or GALAXALIGN_PROGRESS=force), and
    with ``disable=True`` (e.g. on every worker but one)."""
    from tqdm.auto import tqdm

    force = os.environ.get("GALAXALIGN_PROGRESS") == "force"
    disabled = kw.pop("disable", False) or not (force or (_enabled and sys.stderr.isatty()))
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disabled, dynamic_ncols=True, file=sys.stderr, **kw)


class RateLog:
    """Progress as log lines every ``every`` seconds, for logs that are not a terminal (cluster jobs).

    ``update(done, sources)`` logs ``progress: D/T tiles, S sources, R sources/s, ETA ...`` when
    ``every`` seconds passed since the last line. Active when stderr is not a TTY (where the bar is
    silent) or when ``force`` is true; ``every <= 0`` turns it off.
    """

    def __init__(self, total: int, every: float = 30.0, *, logger=None, force: bool = False, what: str = "tiles"):
        import logging
        import time

        self.total, self.every, self.what = total, float(every), what
        self.log = logger or logging.getLogger("galaxalign_batch")
        self.active = self.every > 0 and (force or not sys.stderr.isatty())
        self._clock = time.perf_counter
        self.start = self.last = self._clock()
        self.lines = 0

    def line(self, done: int, sources: int) -> str:
        elapsed = max(self._clock() - self.start, 1e-9)
        rate = sources / elapsed
        if 0 < done < self.total:
            left = elapsed / done * (self.total - done)
            eta = f"ETA {int(left // 3600)}h{int(left % 3600 // 60):02d}m{int(left % 60):02d}s"
        else:
            eta = "ETA -" if done < self.total else "finishing"
        return (f"progress: {done}/{self.total} {self.what}, {sources} sources, {rate:.1f} sources/s, "
                f"{elapsed:.0f} s elapsed, {eta}")

    def update(self, done: int, sources: int) -> None:
        if not self.active:
            return
        now = self._clock()
        if now - self.last >= self.every:
            self.last = now
            self.lines += 1
            self.log.info("%s", self.line(done, sources))
