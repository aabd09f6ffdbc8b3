"""Section reads of Legacy Survey bricks: decompress only the fpack tiles the cutouts need.

A brick band is a RICE tile-compressed image (legacypipe writes 100 x 100 px tiles); a whole-brick
read decompresses all 3600 x 3600 px of each of the six image and invvar planes even when a target
list or a cut asks for a few dozen sources. :func:`read_brick_sections` instead

1. reads the headers only (WCS, shape, the ``ZTILE1/ZTILE2`` tile size; bands checked to share one
   grid as in :func:`~galaxalign_batch.survey.bricks.read_brick_files`);
2. puts, around every source, the window its cutout can read (the kernel's reach for the spec and the
   pixel scale) plus a margin of :data:`MARGIN` px, and collects the compression tiles those windows
   meet; neighbouring tiles form components (:func:`components`);
3. reads each component with fitsio section reads (``hdu[y0:y1, x0:x1]``, one per run of tiles in a
   tile row; cfitsio decompresses only the tiles a section overlaps), so each needed tile of each plane
   is decompressed once and no other, and applies the coverage rule on the component;
4. returns a :class:`~galaxalign_batch.survey.tile.Tile` of the brick's full size whose pixels outside
   the tiles read are zero and invalid; its arrays are allocated zeroed by the OS (pages never
   written cost no memory). Cut the same sources from it (the margin depends on how many there are).

Cutouts from such a tile equal cutouts from the whole brick **bit for bit** (tested): every pixel a
cutout reads is in a rectangle; the coverage rule labels exact-zero regions of at least
:data:`~galaxalign_batch.survey.tile.MIN_ZERO_REGION` px, and a region reaching a pixel of the cutout
has that many pixels within the margin when it has them at all; when the kernel consults its 16-px
invalid-pixel blocks (many sources) the margin is 16 px, so that it sees whole blocks. Differences from a whole read: a band that is NaN
everywhere else is not an error (nothing outside the tiles read is looked at); maskbits are not read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey.tile import (MIN_ZERO_REGION, Tile, _first_line, celestial_wcs, check_declared_size,
                                          coverage_planes, header_summary, image_hdu_index, open_fits, read_header)

#: px around each cutout's reach that is read too: >= MIN_ZERO_REGION (coverage rule) and >= the kernel's
#: 16 px invalid-pixel blocks (preprocess.kernels.BLOCK), so both see what they would in the whole brick
MARGIN = max(MIN_ZERO_REGION, 16)


@dataclass
class SectionStats:
    """What a section read decompressed: pixels (all planes), section reads per plane, planes read."""

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


def reach_px(spec, pixscale: float, rotated: bool = True) -> int:
    """Pixels from a source's centre that its cutout may read: on the separable path (``rotated`` False: the
    WCS is a flip or quarter turn of north-up, as for every brick) the taps of ``kernels.axis_taps``; on the
    rotated grid the half-diagonal of the footprint (what the kernel itself allows for)."""
    from galaxalign_batch.preprocess.kernels import taps_per_axis

    step = spec.step(pixscale)
    ntaps = taps_per_axis(step)
    if rotated:
        return int(math.ceil(0.7072 * spec.out_size * step + ntaps + 2))
    return int(math.ceil(0.5 * (spec.out_size - 1) * step + 0.5 * step + ntaps + 2))


def margin_px(n: int, spec, pixscale: float, shape: tuple[int, int]) -> int:
    """The margin read around each cutout's reach: :data:`~galaxalign_batch.survey.tile.MIN_ZERO_REGION`
    for the coverage rule, or :data:`MARGIN` (16) when ``make_cutouts`` of these ``n`` sources will consult its
    16-px invalid-pixel blocks (it does when their windows add up to more than the image: dense selections)."""
    from galaxalign_batch.preprocess.kernels import taps_per_axis

    step = spec.step(pixscale)
    uses_blocks = n * ((spec.out_size - 1) * step + taps_per_axis(step)) ** 2 > shape[0] * shape[1]
    return MARGIN if uses_blocks else MIN_ZERO_REGION


@dataclass
class Component:
    """4-connected compression tiles read together: ``runs`` are (y0, y1, x0, x1) pixel rectangles (one per
    run of neighbouring tiles in a tile row), ``box`` their bounding box."""

    runs: list[tuple[int, int, int, int]]
    box: tuple[int, int, int, int]

    @property
    def pixels(self) -> int:
        return sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in self.runs)


def needed_tiles(x: np.ndarray, y: np.ndarray, reach, shape: tuple[int, int], tile_dims: tuple[int, int],
                 margin: int = MARGIN) -> set[tuple[int, int]]:
    """Compression tiles ``(row, column)`` met by the window (``reach + margin`` px; ``reach`` one number or
    one per source) of any source."""
    h, w = shape
    th, tw = tile_dims
    halves = (np.broadcast_to(np.asarray(reach, np.int64), np.shape(x)) + margin).tolist()
    out: set[tuple[int, int]] = set()
    for xi, yi, half in zip(np.asarray(x, np.float64).tolist(), np.asarray(y, np.float64).tolist(), halves):
        cx, cy = math.floor(xi), math.floor(yi)
        x0, x1 = max(cx - half, 0), min(cx + half, w - 1)
        y0, y1 = max(cy - half, 0), min(cy + half, h - 1)
        if x0 > x1 or y0 > y1:
            continue  # the cutout lies off the image: the kernel fills it without reading
        out.update((ty, tx) for ty in range(y0 // th, y1 // th + 1) for tx in range(x0 // tw, x1 // tw + 1))
    return out


def components(tiles: set[tuple[int, int]], shape: tuple[int, int], tile_dims: tuple[int, int]) -> list[Component]:
    """The tiles grouped into 4-connected components (pixels of diagonal tiles do not touch 4-connectedly)."""
    h, w = shape
    th, tw = tile_dims
    left, out = set(tiles), []
    while left:
        seed = min(left)
        group, stack = {seed}, [seed]
        left.discard(seed)
        while stack:
            ty, tx = stack.pop()
            for n in ((ty - 1, tx), (ty + 1, tx), (ty, tx - 1), (ty, tx + 1)):
                if n in left:
                    left.discard(n)
                    group.add(n)
                    stack.append(n)
        runs = []
        for ty in sorted({t[0] for t in group}):
            cols = sorted(t[1] for t in group if t[0] == ty)
            start = prev = cols[0]
            for c in cols[1:] + [None]:
                if c is not None and c == prev + 1:
                    prev = c
                    continue
                runs.append((ty * th, min((ty + 1) * th, h), start * tw, min((prev + 1) * tw, w)))
                if c is not None:
                    start = prev = c
        box = (min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs), max(r[3] for r in runs))
        out.append(Component(runs, box))
    return sorted(out, key=lambda c: c.box)


def plan(frame: BrickFrame, x: np.ndarray, y: np.ndarray, spec) -> list[Component]:
    """What a section read of sources at ``(x, y)`` reads: components of compression tiles."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    from galaxalign_batch.preprocess.cutouts import orientation

    pixscale = float(np.mean(proj_plane_pixel_scales(frame.wcs)) * 3600.0)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rotated = orientation(spec, frame.wcs, x, y, pixscale)[1] if len(x) else np.zeros(0, bool)
    reach = np.where(rotated, reach_px(spec, pixscale, True), reach_px(spec, pixscale, False))
    tiles = needed_tiles(x, y, reach, frame.shape, frame.tile_dims, margin_px(len(x), spec, pixscale, frame.shape))
    return components(tiles, frame.shape, frame.tile_dims)


def read_brick_sections(frame: BrickFrame, x: np.ndarray, y: np.ndarray, spec,
                        stats: SectionStats | None = None) -> Tile:
    """The brick as a full-size :class:`Tile` holding only the pixels the cutouts of sources at ``(x, y)``
    (0-based) need, read with section reads (see the module docstring). ``stats`` collects what was read."""
    bands = tuple(frame.images)
    h, w = frame.shape
    comps = plan(frame, x, y, spec)
    image = np.zeros((len(bands), h, w), np.float32)  # zero pages from the OS: untouched ones cost nothing
    valid = np.zeros((len(bands), h, w), np.bool_)
    handles: dict[Path, object] = {}
    try:
        for b, band in enumerate(bands):
            img_path = frame.images[band]
            iv_path = frame.invvars[band] if frame.invvars is not None else None
            for p in (img_path, iv_path):
                if p is not None and p not in handles:
                    handles[p] = open_fits(p)
            for comp in comps:
                by0, by1, bx0, bx1 = comp.box
                # pixels of the box outside the component's tiles: 1 with invvar 1 (valid, not zero), never kept
                img = np.ones((by1 - by0, bx1 - bx0), np.float32)
                iv = np.ones_like(img) if iv_path is not None else None
                for y0, y1, x0, x1 in comp.runs:
                    img[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] = _section(handles[img_path], img_path,
                                                                         frame.exts[img_path], (y0, y1, x0, x1))
                    if iv is not None:
                        iv[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] = _section(handles[iv_path], iv_path,
                                                                            frame.exts[iv_path], (y0, y1, x0, x1))
                img, ok = coverage_section(img, iv)
                for y0, y1, x0, x1 in comp.runs:
                    image[b, y0:y1, x0:x1] = img[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
                    valid[b, y0:y1, x0:x1] = ok[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    finally:
        for f in handles.values():
            f.close()
    if stats is not None:
        planes = len(bands) * (2 if frame.invvars is not None else 1)
        stats.pixels += planes * sum(c.pixels for c in comps)
        stats.whole_pixels += planes * h * w
        stats.rectangles += sum(len(c.runs) for c in comps)
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
    """The coverage rule (:func:`~galaxalign_batch.survey.tile.coverage_planes`, the same pass) on one
    band's rectangle, without the whole-image checks: its pixels come out bit-identical to a whole read's."""
    img, valid, _ = coverage_planes("", [image], ("",), None if invvar is None else [invvar], check=False)
    return img[0], valid[0]


def fraction_needed(frame: BrickFrame, x: np.ndarray, y: np.ndarray, spec) -> float:
    """Share of the brick's pixels a section read of these sources would decompress (0..1)."""
    h, w = frame.shape
    return sum(c.pixels for c in plan(frame, x, y, spec)) / float(h * w)
