"""Sources of a tile: Legacy Survey Tractor catalogs, or detection with sep.

Every function returns an ``astropy.table.Table`` with at least ``object_id`` (str), ``ra``,
``dec`` (float64 deg), ``x``, ``y`` (float64, 0-based pixel in the tile) and ``tile`` (str).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from astropy.table import Table

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey import layout
from galaxalign_batch.survey.bricks import survey_root_of
from galaxalign_batch.survey.tile import Tile, _first_line, open_fits

log = logging.getLogger(__name__)

CENTROID_WINDOW_ARCSEC = 0.6
#: SExtractor's default.conv (3x3 pyramid); thresholds are in units of the unfiltered pixel noise
DETECTION_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)
TRACTOR_REQUIRED = ("release", "brickname", "objid", "ra", "dec")
#: catalog columns copied when present (besides every ``flux_*`` / ``flux_ivar_*`` column)
TRACTOR_PASSTHROUGH = ("release", "brickname", "objid", "type", "shape_r", "shape_e1", "shape_e2", "sersic",
                       "maskbits", "true_class", "true_class_key")


def _as_str(col) -> np.ndarray:
    arr = np.asarray(col)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "ascii", "replace")
    return np.char.strip(arr.astype(str))


def read_tractor(path: str | os.PathLike, tile: Tile | None = None, primary_only: bool = True,
                 keep: tuple[str, ...] = ()) -> Table:
    """Read a Tractor catalog (``tractor-<brick>.fits``) into a Sources table.

    ``primary_only`` keeps rows with ``brick_primary`` true. ``keep``: more catalog columns to pass
    through (lower-case names; for ``--where`` and ``--keep-columns``), besides the usual ones. Pixel positions come from ``bx, by``
    (0-based) when ``tile`` is None or is the catalog's own brick, otherwise from ``ra, dec``
    through the tile's WCS; with a tile, sources whose centre falls off the tile are dropped.
    """
    path = Path(path)
    with open_fits(path) as f:
        ext = next((i for i, hdu in enumerate(f) if hdu.get_info()["hdutype"] in (1, 2)), None)
        if ext is None:
            raise TileError(path, "no table HDU (not a Tractor catalog)")
        try:
            data = f[ext].read(lower=True)
            columns = [c.lower() for c in f[ext].get_colnames()]
        except (OSError, ValueError) as e:
            raise TileError(path, f"cannot read catalog table ({_first_line(e)})") from None
    missing = [c for c in TRACTOR_REQUIRED if c not in columns]
    if missing:
        raise TileError(path, f"not a Tractor catalog (missing column(s) {', '.join(missing)})")
    if primary_only:
        if "brick_primary" in columns:
            data = data[np.asarray(data["brick_primary"]).astype(bool)]
        else:
            log.warning("%s: no brick_primary column; keeping every row", path)

    release = np.asarray(data["release"]).astype(np.int64)
    brickname = _as_str(data["brickname"])
    objid = np.asarray(data["objid"]).astype(np.int64)
    ra = np.asarray(data["ra"], dtype=np.float64)
    dec = np.asarray(data["dec"], dtype=np.float64)

    own_brick = tile is None or (tile.kind == "brick" and bool(np.all(brickname == tile.name)))
    if own_brick and "bx" in columns and "by" in columns:
        x = np.asarray(data["bx"], dtype=np.float64)
        y = np.asarray(data["by"], dtype=np.float64)
    elif tile is not None:
        x, y = (np.atleast_1d(v) for v in tile.world_to_pixel(ra, dec))
    else:
        raise TileError(path, "catalog has no bx/by columns and no tile was given to place the sources")

    out = Table()
    out["object_id"] = np.array([f"{r}/{b}/{o}" for r, b, o in zip(release, brickname, objid)], dtype=str)
    out["ra"], out["dec"], out["x"], out["y"] = ra, dec, x, y
    out["tile"] = np.full(len(ra), tile.name) if tile is not None else brickname
    for c in columns:
        if c in TRACTOR_PASSTHROUGH or c.startswith("flux_") or c in keep:
            col = np.asarray(data[c])
            out[c] = _as_str(col) if col.dtype.kind in "SU" else col.astype(col.dtype.newbyteorder("="))
    if tile is not None:
        inside = tile.contains(out["x"], out["y"])
        if not inside.all():
            log.info("%s: %d of %d sources lie off tile %s; dropped", path, int((~inside).sum()), len(out), tile.name)
            out = out[inside]
    out.meta["catalog"] = str(path)
    return out


def _background_box(tile: Tile, box: int | None) -> int:
    if box is not None:
        return int(box)
    return int(max(32, min(256, min(tile.shape) // 3)))


def detection_image(tile: Tile, bands: tuple[str, ...] | None = None, background_box: int | None = None):
    """(detection image, per-pixel 1-sigma error, mask, per-band background-subtracted images).

    The detection image is the inverse-variance weighted mean of the background-subtracted bands
    (weights: ``invvar`` when the tile has it, else 1/rms^2 of each band's sep background).
    """
    import sep

    use = tuple(tile.bands) if bands is None else tuple(bands)
    box = _background_box(tile, background_box)
    num = np.zeros(tile.shape, np.float64)
    wsum = np.zeros(tile.shape, np.float64)
    subtracted = {}
    for band in use:
        b = tile.band_index(band)
        img = np.ascontiguousarray(tile.image[b], dtype=np.float32)
        invalid = ~tile.valid[b]
        if invalid.all():
            continue
        bkg = sep.Background(img, mask=invalid, bw=box, bh=box, fw=3, fh=3)
        sub = img - bkg.back(dtype=np.float32)
        sub[invalid] = 0.0
        subtracted[band] = sub
        if tile.invvar is not None:
            weight = tile.invvar[b].astype(np.float64)
        else:
            rms = float(bkg.globalrms)
            if not np.isfinite(rms) or rms <= 0:
                continue
            weight = np.where(invalid, 0.0, 1.0 / rms**2)
        num += weight * sub
        wsum += weight
    if not subtracted:
        raise TileError(tile.path, "no valid pixels in the detection bands")
    mask = wsum <= 0
    det = np.where(mask, 0.0, num / np.where(mask, 1.0, wsum)).astype(np.float32)
    err = np.where(mask, 1.0, 1.0 / np.sqrt(np.where(mask, 1.0, wsum))).astype(np.float32)
    return det, err, mask, subtracted


def noise_correlation(det: np.ndarray, err: np.ndarray, mask: np.ndarray, box: int) -> float:
    """How much more noise the filtered detection image has than white noise of ``err`` would give.

    Coadds and resampled viewer cubes have pixel-to-pixel correlated noise, which the detection
    filter barely averages down; thresholds scaled by this factor (>= 1) keep the false-detection
    rate of white noise. Measured as sep's sigma-clipped rms of the filtered ``det / err``.
    """
    import sep
    from scipy import ndimage

    kernel = DETECTION_KERNEL / DETECTION_KERNEL.sum()
    white = float(np.sqrt((kernel**2).sum()))
    significance = np.where(mask, 0.0, det / err)
    filtered = ndimage.convolve(significance, kernel, mode="nearest").astype(np.float32)
    edge = ndimage.binary_dilation(mask, iterations=1)
    if edge.all():
        return 1.0
    rms = float(sep.Background(filtered, mask=edge, bw=box, bh=box).globalrms)
    return max(1.0, rms / white) if np.isfinite(rms) and rms > 0 else 1.0


def window_sigma(tile: Tile) -> float:
    """Gaussian window (px) of the centroid refinement: 0.6 arcsec, at least one pixel."""
    return max(1.0, CENTROID_WINDOW_ARCSEC / tile.pixscale)


def refine_centres(det: np.ndarray, mask: np.ndarray, objs: np.ndarray, sigma: float):
    """Windowed centroids started at each object's filtered-image peak; the isophotal barycentre
    where the iteration fails or wanders more than 2 sigma (a galaxy's nucleus, not its isophote)."""
    import sep

    bx, by = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
    if len(objs) == 0:
        return bx, by
    px, py = objs["xcpeak"].astype(np.float64), objs["ycpeak"].astype(np.float64)
    wx, wy, _ = sep.winpos(det, px, py, np.full(len(objs), sigma), mask=mask)
    good = np.isfinite(wx) & np.isfinite(wy) & (np.hypot(wx - px, wy - py) <= 2.0 * sigma)
    return np.where(good, wx, bx), np.where(good, wy, by)


def flux_scale(tile: Tile) -> float:
    """Factor from summed pixel values to nanomaggies: viewer cubes keep the native pixel's units.

    The Legacy Survey viewer resamples cutouts keeping nanomaggies per native 0.262" pixel (the
    summed r flux of the galaxy of example_a at 0.1"/px is 6.86 x that of temp_small at 0.262"/px,
    (0.262/0.1)^2 = 6.86); bricks are on the native grid (factor 1).
    """
    if tile.kind == "cube":
        return float((tile.pixscale / layout.PIXSCALE) ** 2)
    return 1.0


def detect_sources(tile: Tile, *, nsigma: float = 1.5, minarea: int = 5, deblend_nthresh: int = 32,
                   deblend_cont: float = 0.005, bands: tuple[str, ...] | None = None,
                   background_box: int | None = None, id_prefix: str | None = None) -> Table:
    """Detect sources with sep on the weighted band mean (threshold ``nsigma`` x per-pixel error).

    ``x, y`` are windowed centroids (:func:`refine_centres`). Rows are sorted by (y, x) and named
    ``"{id_prefix}/det{i}"``; ``id_prefix`` defaults to ``tile.name``, which is not unique across
    folders (``embed`` passes the tile's key, a resolved path, so that its ids are). Columns besides
    the standard ones: ``flux`` (detection image) and ``flux_<band>`` (Kron, 2.5 Kron radii),
    nanomaggies (see :func:`flux_scale`),
    ``a``, ``b`` (px), ``theta`` (rad), ``npix``, ``peak``, ``flags`` (sep flags).
    """
    import sep

    det, err, mask, subtracted = detection_image(tile, bands, background_box)
    correlation = noise_correlation(det, err, mask, _background_box(tile, background_box))
    h, w = tile.shape
    sep.set_extract_pixstack(max(sep.get_extract_pixstack(), h * w // 8))
    try:
        objs = sep.extract(det, nsigma, err=err * np.float32(correlation), mask=mask, minarea=minarea,
                           filter_kernel=DETECTION_KERNEL, filter_type="conv",
                           deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont)
    except Exception as e:  # sep raises plain Exception on buffer overflows
        raise TileError(tile.path, f"source detection failed ({_first_line(e)})") from None
    x, y = refine_centres(det, mask, objs, window_sigma(tile))
    order = np.lexsort((x, y))
    objs, x, y = objs[order], x[order], y[order]
    ra, dec = (np.atleast_1d(v) for v in tile.pixel_to_world(x, y))

    out = Table()
    prefix = tile.name if id_prefix is None else id_prefix
    out["object_id"] = np.array([f"{prefix}/det{i}" for i in range(len(objs))], dtype=str)
    out["ra"], out["dec"], out["x"], out["y"] = ra, dec, x, y
    out["tile"] = np.full(len(objs), tile.name)
    scale = flux_scale(tile)
    out["flux"] = objs["flux"].astype(np.float64) * scale
    out["a"] = objs["a"].astype(np.float64)
    out["b"] = objs["b"].astype(np.float64)
    out["theta"] = objs["theta"].astype(np.float64)
    out["npix"] = objs["npix"].astype(np.int64)
    out["peak"] = objs["peak"].astype(np.float64)
    out["flags"] = objs["flag"].astype(np.int64)
    if len(objs):
        a = np.maximum(np.asarray(out["a"]), 0.5)
        b = np.maximum(np.asarray(out["b"]), 0.5)
        theta = np.asarray(out["theta"], np.float64)
        kron, kflag = sep.kron_radius(det, x, y, a, b, theta, 6.0, mask=mask)
        radius = np.maximum(2.5 * np.where(np.isfinite(kron) & (kron > 0), kron, 1.0), 1.75)
        for band, sub in subtracted.items():
            valid = tile.valid[tile.band_index(band)]
            flux, _, _ = sep.sum_ellipse(sub, x, y, a, b, theta, radius, mask=~valid, subpix=1)
            out[f"flux_{band}"] = np.asarray(flux, np.float64) * scale
    else:
        for band in subtracted:
            out[f"flux_{band}"] = np.zeros(0, np.float64)
    out.meta["detection"] = {"nsigma": nsigma, "minarea": minarea, "bands": "".join(bands or tile.bands),
                             "noise_correlation": correlation, "flux_scale": scale}
    return out


def sources_for(tile: Tile, catalog: str | os.PathLike | None = "auto", columns: tuple[str, ...] = (),
                **detect_kw) -> Table:
    """Sources of ``tile``: a Tractor catalog when there is one, else sep detection.

    ``catalog``: ``"auto"`` uses ``tractor_path(root, brick)`` for a brick read from a survey
    tree when that file exists; a path reads that catalog; None or ``"detect"`` always detects.
    ``columns``: more Tractor columns to pass through (see :func:`read_tractor`).
    """
    if isinstance(catalog, str) and catalog == "detect":
        catalog = None
    if catalog is not None and not (isinstance(catalog, str) and catalog == "auto"):
        return read_tractor(catalog, tile, keep=columns)
    if catalog == "auto":
        root = survey_root_of(tile)
        if root is not None:
            cat = layout.tractor_path(root, tile.name)
            if cat.exists():
                return read_tractor(cat, tile, keep=columns)
            log.info("%s: no Tractor catalog at %s; detecting sources", tile.name, cat)
    return detect_sources(tile, **detect_kw)
