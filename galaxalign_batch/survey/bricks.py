"""Legacy Survey coadd bricks: per-band fpack images (HDU 1), inverse variances and maskbits."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey import layout
from galaxalign_batch.survey.layout import BRICK_FILE_RE, parse_brick_filename  # noqa: F401 (re-exported)
from galaxalign_batch.survey.tile import (
    Tile, celestial_wcs, coverage_planes, header_summary, image_hdu_index, open_fits, read_hdu,
)

log = logging.getLogger(__name__)

#: pixels may differ by this much between the WCSs of two bands before they count as disagreeing
WCS_TOLERANCE_PX = 1e-3


def _read_plane(path: Path):
    with open_fits(path) as f:
        ext = image_hdu_index(path, f)
        data, header = read_hdu(path, f, ext)
    if data.ndim != 2:
        raise TileError(path, f"expected a 2-D image, got shape {data.shape}")
    return data, header


def _same_grid(w_ref, w_other, shape: tuple[int, int]) -> bool:
    """True if two WCSs put the corners and centre of an image of ``shape`` on the same sky positions."""
    h, w = shape
    xs = np.array([0.0, w - 1.0, 0.0, w - 1.0, (w - 1) / 2])
    ys = np.array([0.0, 0.0, h - 1.0, h - 1.0, (h - 1) / 2])
    ra, dec = w_ref.all_pix2world(xs, ys, 0)
    x2, y2 = w_other.all_world2pix(ra, dec, 0)
    return bool(np.all(np.hypot(x2 - xs, y2 - ys) < WCS_TOLERANCE_PX))


def read_brick_files(image_paths: Mapping[str, str | os.PathLike],
                     invvar_paths: Mapping[str, str | os.PathLike] | None = None,
                     maskbits_path: str | os.PathLike | None = None,
                     name: str | None = None) -> Tile:
    """A brick :class:`Tile` from per-band image files given directly (bands in the mapping's order).

    ``invvar_paths`` (same bands) and ``maskbits_path`` are optional. All planes must share one
    shape and one WCS. Invalid pixels: ``invvar == 0``, NaN/inf, zero-valued no-coverage regions.
    """
    if not image_paths:
        raise ValueError("image_paths is empty: give at least one band")
    bands = tuple(image_paths)
    paths = {b: Path(p) for b, p in image_paths.items()}
    first = paths[bands[0]]
    for band, p in paths.items():
        if not p.exists():
            raise TileError(p, f"missing band {band} (file does not exist)")
    planes, wcs, header0 = [], None, None
    for band in bands:
        data, header = _read_plane(paths[band])
        w = celestial_wcs(paths[band], header, data.shape)
        if wcs is None:
            wcs, header0 = w, header
        elif data.shape != planes[0].shape:
            raise TileError(paths[band], f"band {band} is {data.shape[1]}x{data.shape[0]} px, band "
                                         f"{bands[0]} is {planes[0].shape[1]}x{planes[0].shape[0]} px")
        elif not _same_grid(wcs, w, data.shape):
            raise TileError(paths[band], f"band {band} has a different WCS from band {bands[0]}")
        planes.append(data)
    shape = planes[0].shape

    invvar = None
    if invvar_paths is not None:
        if set(invvar_paths) != set(bands):
            raise ValueError(f"invvar bands {sorted(invvar_paths)} differ from image bands {list(bands)}")
        ivplanes = []
        for band in bands:
            p = Path(invvar_paths[band])
            if not p.exists():
                raise TileError(p, f"missing invvar for band {band} (file does not exist)")
            data, _ = _read_plane(p)
            if data.shape != shape:
                raise TileError(p, f"invvar shape {data.shape} differs from image shape {shape}")
            ivplanes.append(data)
        invvar = ivplanes

    maskbits = None
    if maskbits_path is not None:
        p = Path(maskbits_path)
        if not p.exists():
            raise TileError(p, "missing maskbits file (file does not exist)")
        data, _ = _read_plane(p)
        if data.shape != shape:
            raise TileError(p, f"maskbits shape {data.shape} differs from image shape {shape}")
        if not np.issubdtype(data.dtype, np.integer):
            raise TileError(p, f"maskbits must be integers, got {data.dtype}")
        maskbits = data.astype(np.int32, copy=False)

    # one compiled pass per band writes the (bands, H, W) stack from fitsio's planes (no np.stack first),
    # dropping each band's planes once written (``data`` above held the last one)
    data = None
    image, valid, invvar = coverage_planes(first, planes, bands, invvar, consume=True)
    summary = header_summary(header0)
    parsed = parse_brick_filename(first)
    if name is None:
        name = summary.get("BRICKNAME") or summary.get("BRICK") or (parsed["brick"] if parsed else None) \
            or first.name.split(".")[0]
    summary.setdefault("BRICKNAME", name)
    return Tile(name=str(name), path=str(first), kind="brick", bands=bands, image=image, valid=valid,
                wcs=wcs, invvar=invvar, maskbits=maskbits, header=summary)


def read_brick(root: str | os.PathLike, brick: str, bands: tuple[str, ...] = layout.BANDS,
               with_invvar: bool = True, with_maskbits: bool = True) -> Tile:
    """Read brick ``brick`` of the Legacy Survey tree at ``root`` (``coadd/<AAA>/<brick>/...``).

    ``with_invvar`` / ``with_maskbits`` read those files too; a missing one is a TileError, as is
    a missing band image ("missing band r").
    """
    if not bands:
        raise ValueError("bands is empty")
    images = {b: layout.image_path(root, brick, b, "image") for b in bands}
    invvars = {b: layout.image_path(root, brick, b, "invvar") for b in bands} if with_invvar else None
    mask = layout.maskbits_path(root, brick) if with_maskbits else None
    return read_brick_files(images, invvars, mask, name=brick)


def brick_siblings(path: str | os.PathLike) -> tuple[str, dict, dict, Path | None]:
    """For any coadd file of a brick: (brick, image paths, invvar paths, maskbits path) present beside it.

    Bands are the image files found there, g r z first (in that order) then any others sorted.
    """
    p = Path(path)
    parsed = parse_brick_filename(p)
    if parsed is None:
        raise TileError(p, "not a Legacy Survey coadd file name (legacysurvey-<brick>-image-<band>.fits.fz)")
    brick, folder = parsed["brick"], p.parent
    found = {}
    for q in folder.glob(f"legacysurvey-{brick}-image-*.fits*"):
        info = parse_brick_filename(q)
        if info and info["kind"] == "image":
            found.setdefault(info["band"], q)
    order = [b for b in layout.BANDS if b in found] + sorted(set(found) - set(layout.BANDS))
    images = {b: found[b] for b in order}
    invvars = {b: folder / found[b].name.replace("-image-", "-invvar-") for b in order}
    maskbits = next((q for q in sorted(folder.glob(f"legacysurvey-{brick}-maskbits.fits*"))), None)
    return brick, images, invvars, maskbits


def read_brick_at(path: str | os.PathLike, bands: tuple[str, ...] | None = layout.BANDS) -> Tile:
    """The whole brick that the coadd file ``path`` (any band, image/invvar/maskbits) belongs to.

    ``bands`` defaults to g r z (each required); ``None`` takes whichever bands are there.
    Invvar planes are read when present for every band, maskbits when present.
    """
    brick, images, invvars, maskbits = brick_siblings(path)
    if bands is not None:
        folder = Path(path).parent
        for b in bands:
            if b not in images:
                raise TileError(folder / f"legacysurvey-{brick}-image-{b}.fits.fz", f"missing band {b} of brick {brick}")
        images = {b: images[b] for b in bands}
        invvars = {b: invvars[b] for b in bands}
    if not images:
        raise TileError(path, f"no image files of brick {brick} beside it")
    if not all(p.exists() for p in invvars.values()):
        missing = [b for b, p in invvars.items() if not p.exists()]
        log.warning("%s: no invvar for band(s) %s; coverage from the images alone", path, ",".join(missing))
        invvars = None
    return read_brick_files(images, invvars, maskbits, name=brick)


def survey_root_of(tile: Tile) -> Path | None:
    """The survey root a brick tile was read from (its image path matches the layout), else None."""
    if tile.kind != "brick":
        return None
    p = Path(tile.path)
    if len(p.parents) < 4:
        return None
    root = p.parents[3]
    band = tile.bands[0]
    if layout.image_path(root, tile.name, band) == p:
        return root
    return None
