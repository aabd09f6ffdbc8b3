"""Survey I/O: which files are tiles (files, folders, globs, survey roots, releases), Legacy Survey
bricks, viewer cutout cubes, Tractor catalogs and source detection.

``open_tile`` reads any supported input into a :class:`Tile`; ``sources_for`` gives its sources.
See ``docs/survey.md`` for the coverage rule, object ids and errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey import layout
from galaxalign_batch.survey.bricks import parse_brick_filename, read_brick, read_brick_at, read_brick_files
from galaxalign_batch.survey.cubes import read_cube
from galaxalign_batch.survey.sources import detect_sources, read_tractor, sources_for
from galaxalign_batch.survey.tile import MIN_ZERO_REGION, Tile
from galaxalign_batch.survey.tiles import TileRef, resolve_tiles


def open_tile(path: str | os.PathLike, brick: str | None = None) -> Tile:
    """Open a tile: ``open_tile(root, brick)`` for a brick of a survey tree, ``open_tile(file)`` for
    a Legacy Survey coadd file (any band: the whole g r z brick is read) or a cutout cube."""
    p = Path(path)
    if brick is not None:
        if not p.is_dir():
            raise TileError(p, "survey root does not exist or is not a directory")
        return read_brick(p, brick)
    if p.is_dir():
        raise TileError(p, "is a directory: give a brick name too, open_tile(root, brick)")
    if parse_brick_filename(p) is not None:
        return read_brick_at(p)
    return read_cube(p)


__all__ = [
    "TileRef", "resolve_tiles", "Tile", "TileError", "open_tile", "read_brick", "read_brick_files", "read_brick_at", "read_cube",
    "read_tractor", "detect_sources", "sources_for", "layout", "MIN_ZERO_REGION",
]
