"""Legacy Survey viewer cutout cubes: one FITS image ``(bands, H, W)`` float32 with a TAN WCS."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey.layout import BANDS
from galaxalign_batch.survey.tile import (
    Tile, celestial_wcs, coverage, header_summary, image_hdu_index, open_fits, read_hdu,
)

log = logging.getLogger(__name__)

DEFAULT_CUBE_BANDS = BANDS


def cube_bands(path: str | os.PathLike, header, nbands: int) -> tuple[str, ...]:
    """Band names from ``BAND0..`` or ``BANDS``; g r z for an unlabelled 3-plane cube."""
    per_key = [header.get(f"BAND{i}") for i in range(nbands)]
    if all(isinstance(b, str) and b.strip() for b in per_key):
        return tuple(b.strip() for b in per_key)
    bands = str(header.get("BANDS", "")).strip()
    if len(bands) == nbands:
        return tuple(bands)
    if nbands == 1:
        single = str(header.get("BAND", header.get("FILTER", ""))).strip()
        if single:
            return (single,)
    if nbands == len(DEFAULT_CUBE_BANDS):
        log.warning("%s: no BANDS/BAND0 header, assuming bands %s", path, "".join(DEFAULT_CUBE_BANDS))
        return DEFAULT_CUBE_BANDS
    raise TileError(path, f"cannot tell the bands of a {nbands}-plane cube (no BANDS or BAND0.. header)")


def read_cube(path: str | os.PathLike) -> Tile:
    """Read a viewer cutout cube (or a single-band 2-D image) into a :class:`Tile` (``kind="cube"``).

    Coverage: non-finite pixels and exact zeros in connected regions of at least
    ``tile.MIN_ZERO_REGION`` pixels are invalid (the viewer writes 0 where a band has no data).
    """
    path = Path(path)
    with open_fits(path) as f:
        ext = image_hdu_index(path, f)
        data, header = read_hdu(path, f, ext)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise TileError(path, f"expected a (bands, H, W) image, got {data.ndim} axes {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise TileError(path, f"non-numeric image data ({data.dtype})")
    bands = cube_bands(path, header, data.shape[0])
    wcs = celestial_wcs(path, header, data.shape[1:])
    image, valid, _ = coverage(path, data, bands, copy=False)  # data is a fresh array from fitsio
    name = path.name.removesuffix(".fz").removesuffix(".gz").removesuffix(".fits").removesuffix(".fit")
    return Tile(name=name, path=str(path), kind="cube", bands=bands, image=image, valid=valid, wcs=wcs,
                header=header_summary(header))
