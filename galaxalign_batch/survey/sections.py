"""Section reads of Legacy Survey bricks: decompress only the fpack tiles the cutouts need.

A brick band is a RICE tile-compressed image (legacypipe writes 100 x 100 px tiles); a whole-brick
read decompresses all 3600 x 3600 px of each of the six image and invvar planes even when a target
list or a cut asks for a few dozen sources. :func:`read_brick_sections` instead

1. reads the headers only (WCS, shape, the ``ZTILE1/ZTILE2`` tile size; bands checked to share one
   grid as in :func:`~galaxalign_batch.survey.bricks.read_brick_files`);
2. puts, around every source, the window its cutout can read (the kernel's reach for the spec and the
   pixel scale) plus a margin of :data:`MARGIN` px, expands it to whole compression tiles and merges
   windows that overlap, so each needed tile is decompressed once per plane;
3. reads each merged rectangle of each plane with a fitsio section read (``hdu[y0:y1, x0:x1]``,
   cfitsio decompresses only the tiles it overlaps) and applies the coverage rule on it;
4. returns a :class:`~galaxalign_batch.survey.tile.Tile` of the brick's full size whose pixels outside
   the rectangles are zero and invalid; its arrays are allocated zeroed by the OS (pages never
   written cost no memory).

Cutouts from such a tile equal cutouts from the whole brick **bit for bit** (tested): every pixel a
cutout reads is in a rectangle; the coverage rule labels exact-zero regions of at least
:data:`~galaxalign_batch.survey.tile.MIN_ZERO_REGION` px, and a region reaching a pixel of the cutout
has that many pixels within the margin when it has them at all; the margin (16 px) also covers the
16 px blocks of the kernel's invalid-pixel map. Differences from a whole read: a band that is NaN
everywhere else is not an error (nothing outside the rectangles is looked at); maskbits are not read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey.tile import (MIN_ZERO_REGION, Tile, _first_line, celestial_wcs, check_declared_size,
                                          header_summary, image_hdu_index, open_fits, read_header, zero_regions)

#: px around each cutout's reach that is read too: >= MIN_ZERO_REGION (coverage rule) and >= the kernel's
#: 16 px invalid-pixel blocks (preprocess.kernels.BLOCK), so both see what they would in the whole brick
MARGIN = max(MIN_ZERO_REGION, 16)


@dataclass
class SectionStats:
    """What a section read decompressed: pixels (all planes), rectangles and planes read."""

    pixels: int = 0
    whole_pixels: int = 0  # what a whole read of the same planes decompresses
    rectangles: int = 0
    planes: int = 0

    def as_dict(self) -> dict:
        return {"pixels": self.pixels, "whole_pixels": self.whole_pixels, "rectangles": self.rectangles,
                "planes": self.planes}


@dataclass
class BrickFrame:
    """A brick's geometry from its headers, before any pixel is read."""

    name: str
    images: dict[str, Path]
    invvars: dict[str, Path] | None
    shape: tuple[int, int]  # (H, W)
    tile_dims: tuple[int, int]  # compression tile (rows, columns); (1, W) for row tiles or plain images
    wcs: object
    header: dict
    exts: dict[Path, int] = field(default_factory=dict)


def _plane_info(path: Path):
    with open_fits(path) as f:
        ext = image_hdu_index(path, f)
        info = f[ext].get_info()
        header = read_header(path, f, ext)
        raw = f[ext].read_header()
        check_declared_size(path, f, ext)
    dims = [int(d) for d in info["dims"]]
    if len(dims) != 2:
        raise TileError(path, f"expected a 2-D image, got shape {tuple(dims)}")
    h, w = dims
    if info.get("is_compressed_image") and "ZTILE1" in raw and "ZTILE2" in raw:
        tiles = (int(raw["ZTILE2"]), int(raw["ZTILE1"]))
    else:
        tiles = (1, w)
    return ext, (h, w), tiles, header


def brick_frame(images: dict[str, str | os.PathLike], invvars: dict[str, str | os.PathLike] | None = None,
                name: str | None = None) -> BrickFrame:
    """Headers of a brick's band images (and invvars): shape, WCS (bands must agree), compression tiles."""
    from galaxalign_batch.survey.bricks import _same_grid, parse_brick_filename

    images = {b: Path(p) for b, p in images.items()}
    invvars = {b: Path(p) for b, p in invvars.items()} if invvars is not None else None
    bands = tuple(images)
    first = images[bands[0]]
    exts: dict[Path, int] = {}
    shape = tiles = wcs = header0 = None
    for band in bands:
        p = images[band]
        if not p.exists():
            raise TileError(p, f"missing band {band} (file does not exist)")
        ext, s, t, header = _plane_info(p)
        exts[p] = ext
        w = celestial_wcs(p, header, s)
        if wcs is None:
            shape, tiles, wcs, header0 = s, t, w, header
        elif s != shape:
            raise TileError(p, f"band {band} is {s[1]}x{s[0]} px, band {bands[0]} is {shape[1]}x{shape[0]} px")
        elif not _same_grid(wcs, w, s):
            raise TileError(p, f"band {band} has a different WCS from band {bands[0]}")
        elif t != tiles:
            tiles = (math.gcd(tiles[0], t[0]), math.gcd(tiles[1], t[1]))  # a grid both tilings align to
    if invvars is not None:
        for band in bands:
            p = invvars[band]
            if not p.exists():
                raise TileError(p, f"missing invvar for band {band} (file does not exist)")
            ext, s, t, _ = _plane_info(p)
            exts[p] = ext
            if s != shape:
                raise TileError(p, f"invvar shape {s} differs from image shape {shape}")
            tiles = (math.gcd(tiles[0], t[0]), math.gcd(tiles[1], t[1]))
    summary = header_summary(header0)
    parsed = parse_brick_filename(first)
    if name is None:
        name = summary.get("BRICKNAME") or summary.get("BRICK") or (parsed["brick"] if parsed else first.name)
    summary.setdefault("BRICKNAME", name)
    return BrickFrame(str(name), images, invvars, shape, tiles, wcs, summary, exts)


def reach_px(spec, pixscale: float) -> int:
    """Pixels from a source's centre that its cutout may read (both resampling paths of the kernel)."""
    from galaxalign_batch.preprocess.kernels import taps_per_axis

    step = spec.step(pixscale)
    return int(math.ceil(0.7072 * spec.out_size * step + taps_per_axis(step) + 2))


def rectangles(x: np.ndarray, y: np.ndarray, reach: int, shape: tuple[int, int],
               tile_dims: tuple[int, int], margin: int = MARGIN) -> list[tuple[int, int, int, int]]:
    """Merged, tile-aligned rectangles ``(y0, y1, x0, x1)`` (end exclusive) covering every source's
    window (``reach + margin`` px around it), clipped to the image; sources off the image need none."""
    h, w = shape
    th, tw = tile_dims
    half = reach + margin
    boxes = []
    for xi, yi in zip(np.asarray(x, np.float64).tolist(), np.asarray(y, np.float64).tolist()):
        cx, cy = math.floor(xi), math.floor(yi)
        x0, x1 = max(cx - half, 0), min(cx + half + 1, w)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue  # the cutout lies off the image: the kernel fills it without reading
        boxes.append([(y0 // th) * th, min(-(-y1 // th) * th, h), (x0 // tw) * tw, min(-(-x1 // tw) * tw, w)])
    # merge overlapping boxes into their bounding box until none overlap
    merged = True
    while merged:
        merged = False
        out: list[list[int]] = []
        for b in sorted(boxes):
            for o in out:
                if b[0] < o[1] and o[0] < b[1] and b[2] < o[3] and o[2] < b[3]:
                    o[0], o[1], o[2], o[3] = min(o[0], b[0]), max(o[1], b[1]), min(o[2], b[2]), max(o[3], b[3])
                    merged = True
                    break
            else:
                out.append(list(b))
        boxes = out
    return [tuple(b) for b in sorted(boxes)]


def section_pixels(rects, planes: int) -> int:
    return planes * sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in rects)


def read_brick_sections(frame: BrickFrame, x: np.ndarray, y: np.ndarray, spec,
                        stats: SectionStats | None = None) -> Tile:
    """The brick as a full-size :class:`Tile` holding only the pixels the cutouts of sources at ``(x, y)``
    (0-based) need, read with section reads (see the module docstring). ``stats`` collects what was read."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    bands = tuple(frame.images)
    h, w = frame.shape
    pixscale = float(np.mean(proj_plane_pixel_scales(frame.wcs)) * 3600.0)
    rects = rectangles(x, y, reach_px(spec, pixscale), frame.shape, frame.tile_dims)
    image = np.zeros((len(bands), h, w), np.float32)  # zero pages from the OS: untouched ones cost nothing
    valid = np.zeros((len(bands), h, w), np.bool_)
    handles: dict[Path, object] = {}
    try:
        for b, band in enumerate(bands):
            paths = [frame.images[band]] + ([frame.invvars[band]] if frame.invvars is not None else [])
            for p in paths:
                if p not in handles:
                    handles[p] = open_fits(p)
            for rect in rects:
                y0, y1, x0, x1 = rect
                img = _section(handles[frame.images[band]], frame.images[band], frame.exts[frame.images[band]], rect)
                iv = None
                if frame.invvars is not None:
                    iv = _section(handles[frame.invvars[band]], frame.invvars[band],
                                  frame.exts[frame.invvars[band]], rect)
                img, ok = coverage_section(img, iv)
                image[b, y0:y1, x0:x1] = img
                valid[b, y0:y1, x0:x1] = ok
    finally:
        for f in handles.values():
            f.close()
    if stats is not None:
        planes = len(bands) * (2 if frame.invvars is not None else 1)
        stats.pixels += section_pixels(rects, planes)
        stats.whole_pixels += planes * h * w
        stats.rectangles += len(rects)
        stats.planes += planes
    return Tile(name=frame.name, path=str(frame.images[bands[0]]), kind="brick", bands=bands, image=image,
                valid=valid, wcs=frame.wcs, invvar=None, maskbits=None, header=dict(frame.header))


def _section(f, path: Path, ext: int, rect) -> np.ndarray:
    y0, y1, x0, x1 = rect
    try:
        data = f[ext][y0:y1, x0:x1]
    except (OSError, ValueError) as e:
        raise TileError(path, f"cannot read HDU {ext} section [{y0}:{y1}, {x0}:{x1}] ({_first_line(e)})") from None
    data = np.asarray(data)
    return data.astype(data.dtype.newbyteorder("="), copy=False)


def coverage_section(image: np.ndarray, invvar: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The coverage rule of :func:`~galaxalign_batch.survey.tile.coverage` on one band's rectangle,
    step for step (so its pixels come out bit-identical), without the whole-image checks."""
    image = np.array(image, dtype=np.float32)
    finite = np.isfinite(image)
    valid = finite  # the same array, as in coverage(): pixels with invvar <= 0 are zeroed before labelling too
    if invvar is not None:
        invvar = np.asarray(invvar, dtype=np.float32)
        valid &= np.isfinite(invvar) & (invvar > 0)
    image[~finite] = 0.0
    if np.any((image == 0) & valid):
        valid &= ~zero_regions(image)
    image[~valid] = 0.0
    return image, valid


def fraction_needed(frame: BrickFrame, x: np.ndarray, y: np.ndarray, spec) -> float:
    """Share of the brick's pixels a section read of these sources would decompress (0..1)."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    pixscale = float(np.mean(proj_plane_pixel_scales(frame.wcs)) * 3600.0)
    rects = rectangles(x, y, reach_px(spec, pixscale), frame.shape, frame.tile_dims)
    h, w = frame.shape
    return section_pixels(rects, 1) / float(h * w)
