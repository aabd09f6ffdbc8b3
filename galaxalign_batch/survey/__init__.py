"""Survey I/O: which files are tiles (files, folders, globs, survey roots, releases), Legacy Survey
bricks, viewer cutout cubes, Tractor catalogs and source detection.

``open_tile`` reads any supported input into a :class:`Tile`; ``sources_for`` gives its sources.
See ``docs/survey.md`` for the coverage rule, object ids and errors.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from galaxalign_batch.errors import TileError

# Imported on first use (PEP 562), so that importing a light module of this package (layout, tiles,
# images) does not import astropy, fitsio, scipy and sep: a re-run of embed with nothing to do takes
# a second or two instead of several (docs/engine.md).
_EXPORTS = {
    "layout": "galaxalign_batch.survey.layout",
    "parse_brick_filename": "galaxalign_batch.survey.bricks", "read_brick": "galaxalign_batch.survey.bricks",
    "read_brick_at": "galaxalign_batch.survey.bricks", "read_brick_files": "galaxalign_batch.survey.bricks",
    "read_cube": "galaxalign_batch.survey.cubes",
    "detect_sources": "galaxalign_batch.survey.sources", "read_tractor": "galaxalign_batch.survey.sources",
    "sources_for": "galaxalign_batch.survey.sources",
    "MIN_ZERO_REGION": "galaxalign_batch.survey.tile", "Tile": "galaxalign_batch.survey.tile",
    "TileRef": "galaxalign_batch.survey.tiles", "resolve_tiles": "galaxalign_batch.survey.tiles",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if name == "layout" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_tile(path: str | os.PathLike, brick: str | None = None):
    """Open a tile: ``open_tile(root, brick)`` for a brick of a survey tree, ``open_tile(file)`` for
    a Legacy Survey coadd file (any band: the whole g r z brick is read) or a cutout cube."""
    from galaxalign_batch.survey.bricks import parse_brick_filename, read_brick, read_brick_at
    from galaxalign_batch.survey.cubes import read_cube

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
