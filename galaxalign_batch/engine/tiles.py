"""Which tiles a run covers: files, directories, globs, @lists and Legacy Survey roots."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from galaxalign_batch.errors import ConfigError

FITS_SUFFIXES = (".fits", ".fits.fz", ".fit", ".fts", ".fits.gz")


@dataclass(frozen=True, order=True)
class TileRef:
    """One unit of work. ``name`` is the store's key: the brick name, or the file's absolute path."""

    name: str
    path: str  # cutout-cube file, or the survey root for a brick
    brick: str | None = None

    @property
    def is_brick(self) -> bool:
        return self.brick is not None


def _is_fits(p: str) -> bool:
    return p.lower().endswith(FITS_SUFFIXES)


def _expand_one(spec: str) -> list[str]:
    if spec.startswith("@"):
        listing = Path(spec[1:])
        if not listing.is_file():
            raise ConfigError(f"{listing}: list file not found")
        out: list[str] = []
        for line in listing.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.extend(_expand_one(line))
        return out
    if any(ch in spec for ch in "*?["):
        hits = sorted(glob.glob(spec, recursive=True))
        if not hits:
            raise ConfigError(f"{spec}: the pattern matches no file")
        return hits
    if not os.path.exists(spec):
        raise ConfigError(f"{spec}: no such file or directory")
    return [spec]


def _add_file(refs: dict[str, TileRef], path: str) -> None:
    """A cutout cube is its own tile; the files of one Legacy Survey brick (bands, invvar, maskbits)
    are one tile named by the brick, opened through any of its image files."""
    from galaxalign_batch.survey.bricks import parse_brick_filename

    a = os.path.abspath(path)
    parsed = parse_brick_filename(a)
    if parsed is None:
        refs.setdefault(a, TileRef(a, a))
    elif parsed["kind"] == "image":
        refs.setdefault(parsed["brick"], TileRef(parsed["brick"], a))


def resolve_tiles(paths: Sequence[str], bricks: Iterable[str] | None = None) -> list[TileRef]:
    """Expand ``--tiles`` arguments (and ``--bricks``) into a sorted, de-duplicated list of tiles.

    - a Legacy Survey root (has ``coadd/``): its bricks (all, or those named in ``bricks``);
    - a directory of FITS files: each file is a tile (searched recursively);
    - a FITS file, a glob, or ``@list.txt`` (one path or pattern per line, ``#`` comments).
    """
    from galaxalign_batch.survey import layout

    wanted = set(bricks) if bricks else None
    refs: dict[str, TileRef] = {}
    for spec in paths:
        for p in _expand_one(os.fspath(spec)):
            if os.path.isdir(p) and layout.is_survey_root(p):
                present = layout.list_bricks(p)
                names = present if wanted is None else sorted(wanted & set(present))
                if wanted is not None and (missing := wanted - set(present)):
                    raise ConfigError(f"{p}: no such brick(s): {', '.join(sorted(missing))}")
                for b in names:
                    refs.setdefault(b, TileRef(b, os.path.abspath(p), b))
            elif os.path.isdir(p):
                files = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True) if _is_fits(f))
                for f in files:
                    _add_file(refs, f)
            else:
                if not _is_fits(p):
                    raise ConfigError(f"{p}: not a FITS file (expected one of {', '.join(FITS_SUFFIXES)})")
                _add_file(refs, p)
    if wanted is not None and not any(r.is_brick for r in refs.values()):
        raise ConfigError("--bricks given but no --tiles path is a Legacy Survey root (a folder with coadd/)")
    if not refs:
        raise ConfigError(f"no tiles found in {', '.join(map(str, paths))}")
    return sorted(refs.values())
