"""Project exceptions. The engine records and skips :class:`TileError`; everything else is fatal.

As zarr-python and astropy do, errors about a value are also :class:`ValueError`, so code that
catches the built-in type works: ``except ValueError`` catches a bad option or a bad tile.
"""

from __future__ import annotations

import os
import tokenize
import zipfile
import zlib

#: What reading a damaged ``.npz`` raises: a truncated file has no zip directory (``BadZipFile``, not an
#: OSError), a damaged member fails its CRC or inflate (``BadZipFile``, ``zlib.error``, ``EOFError``) or
#: inflates to a garbled array header (NumPy's header parser: ``SyntaxError``, ``tokenize.TokenError``),
#: a missing array is a ``KeyError``, a bad header a ``ValueError``.
NPZ_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
                   zlib.error)


class GalaxAlignError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(GalaxAlignError, ValueError):
    """A bad option, configuration file or argument combination (also a :class:`ValueError`)."""


class ClusterError(GalaxAlignError, RuntimeError):
    """Ray could not be started (a local instance) or joined (``--address``, ``RAY_ADDRESS``)."""


class TileError(GalaxAlignError, ValueError):
    """A tile (brick, cutout cube, catalog) that cannot be used (also a :class:`ValueError`).

    The message is one line naming the file and the reason, e.g.
    ``example_incomplete.fits: truncated FITS file (expected 2162880 bytes, found 1389044)``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (Ray ships exceptions)
        return (type(self), (self.path, self.reason))
