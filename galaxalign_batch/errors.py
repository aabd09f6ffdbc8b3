"""Project exceptions. The engine records and skips :class:`TileError`; everything else is fatal."""

from __future__ import annotations

import os


class GalaxAlignError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(GalaxAlignError):
    """A bad option, configuration file or argument combination."""


class TileError(GalaxAlignError):
    """A tile (brick, cutout cube, catalog) that cannot be used.

    The message is one line naming the file and the reason, e.g.
    ``example_incomplete.fits: truncated FITS file (expected 2162880 bytes, found 1389044)``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (Ray ships exceptions)
        return (type(self), (self.path, self.reason))
