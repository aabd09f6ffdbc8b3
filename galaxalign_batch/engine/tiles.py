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
    """One unit of work. ``name`` is the store's key for the tile (:func:`tile_key`)."""

    name: str
    path: str  # cutout-cube file, a file of a loose brick, or the (resolved) survey root for a brick
    brick: str | None = None

    @property
    def is_brick(self) -> bool:
        return self.brick is not None


def brick_key(root: str | os.PathLike, brick: str) -> str:
    """The key of brick ``brick`` of the survey tree at ``root``: its resolved coadd folder.

    ``/data/dr10/south/coadd/150/1501p022``: the resolved path names the root (so the same brick
    name under a north and a south root gives two tiles) and the brick; a symlinked or differently
    spelled root gives the same key.
    """
    from galaxalign_batch.survey import layout

    return os.fspath(layout.coadd_dir(os.path.realpath(os.fspath(root)), brick))


def tile_key(path: str | os.PathLike, brick: str | None = None) -> str:
    """The store key of a tile: :func:`brick_key` for a brick of a survey tree (``path`` its root);
    for a file, its resolved absolute path, or for a loose brick file (outside a tree) its resolved
    folder joined with the brick name. Keys are stable: the same file or brick always has the same key,
    whatever path, symlink or other tiles named it."""
    from galaxalign_batch.survey.bricks import parse_brick_filename

    if brick is not None:
        return brick_key(path, brick)
    real = os.path.realpath(os.fspath(path))
    parsed = parse_brick_filename(real)
    if parsed is None:
        return real
    folder = os.path.dirname(real)
    return folder if os.path.basename(folder) == parsed["brick"] else os.path.join(folder, parsed["brick"])


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
    are one tile, opened through any of its image files."""
    from galaxalign_batch.survey.bricks import parse_brick_filename

    real = os.path.realpath(path)
    parsed = parse_brick_filename(real)
    if parsed is None:
        refs.setdefault(real, TileRef(real, real))
    elif parsed["kind"] == "image":
        refs.setdefault(tile_key(real), TileRef(tile_key(real), real))


def resolve_tiles(paths: Sequence[str], bricks: Iterable[str] | None = None) -> list[TileRef]:
    """Expand ``--tiles`` arguments (and ``--bricks``) into a sorted, de-duplicated list of tiles.

    - a Legacy Survey root (has ``coadd/``): its bricks (all, or those named in ``bricks``);
    - a directory of FITS files: each file is a tile (searched recursively);
    - a FITS file, a glob, or ``@list.txt`` (one path or pattern per line, ``#`` comments).

    Tiles are identified by :func:`tile_key`: a file reached through a symlink or another spelling
    is one tile; the same brick name under two roots is two tiles.
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
                root = os.path.realpath(p)
                for b in names:
                    key = brick_key(root, b)
                    refs.setdefault(key, TileRef(key, root, b))
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
