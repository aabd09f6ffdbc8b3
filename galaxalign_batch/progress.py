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
    """A tqdm bar writing to stderr; silent unless enabled and stderr is a TTY (or GALAXALIGN_PROGRESS=force)."""
    from tqdm.auto import tqdm

    force = os.environ.get("GALAXALIGN_PROGRESS") == "force"
    disabled = not (force or (_enabled and sys.stderr.isatty()))
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disabled, dynamic_ncols=True, file=sys.stderr, **kw)
