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
#: SExtractor's default.conv (3x3 pyramid): the detection filter on the native 0.262"/px grid
DETECTION_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)
#: Every size of the detection and photometry path is an angle (or an area) on the sky, chosen so
#: that a 0.262"/px brick gets exactly what it got when they were pixel counts; on a finer grid
#: they cover the same sky, on a coarser one they never shrink below their native pixel counts.
#: background mesh side: 256 px of a brick (67.1"); a tile smaller than that is one mesh
BACKGROUND_MESH_ARCSEC = 256 * layout.PIXSCALE
#: half-width of the detection filter, a separable tent that is DETECTION_KERNEL at 0.262"/px
FILTER_HALFWIDTH_ARCSEC = 2 * layout.PIXSCALE
#: detected sources, grown by this much, are left out of the sky and noise of the next pass
SOURCE_MASK_ARCSEC = 2.0
#: lags of the pixel-difference noise estimates (pixel noise, filtered noise)
NOISE_LAG_ARCSEC = 1.0
FILTERED_NOISE_LAG_ARCSEC = 2.0
#: at most this many detection passes; stop when the source mask changes by less than
#: MASK_CHANGE_STOP of the tile's pixels
DETECTION_PASSES = 6
MASK_CHANGE_STOP = 0.01
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
    through (lower-case names; for ``--where`` and ``--keep-columns``), besides the usual ones.
    Pixel positions come from ``bx, by``
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


def native_length(pixscale: float, n_native: float) -> float:
    """``n_native`` pixels of the native 0.262"/px grid, in pixels of a grid of ``pixscale`` arcsec/px
    (the same angle on finer grids, never fewer than ``n_native`` pixels on coarser ones)."""
    return float(n_native) * max(1.0, layout.PIXSCALE / float(pixscale))


def native_area(pixscale: float, n_native: float) -> float:
    """An area of ``n_native`` native 0.262"/px pixels, in pixels of a grid of ``pixscale`` (at least ``n_native``)."""
    return float(n_native) * max(1.0, (layout.PIXSCALE / float(pixscale)) ** 2)


def detection_kernel(pixscale: float) -> np.ndarray:
    """The detection filter for a grid of ``pixscale`` arcsec/px: a separable tent of half-width
    FILTER_HALFWIDTH_ARCSEC (0.524"), sampled at the pixels; :data:`DETECTION_KERNEL` (SExtractor's
    default.conv) at 0.262"/px and on every coarser grid, 11x11 px at 0.1"/px."""
    half = native_length(pixscale, FILTER_HALFWIDTH_ARCSEC / layout.PIXSCALE)
    if half <= 2.0 + 1e-6:
        return DETECTION_KERNEL.copy()
    n = int(np.ceil(half - 1e-9)) - 1
    tent = 1.0 - np.abs(np.arange(-n, n + 1)) / half
    return np.outer(tent, tent).astype(np.float32)


def _white(kernel: np.ndarray) -> float:
    """Noise of white noise of unit rms filtered with ``kernel`` (normalised to sum 1)."""
    k = kernel.astype(np.float64) / float(kernel.sum())
    return float(np.sqrt((k**2).sum()))


def _background_box(tile: Tile, mesh: float | None) -> tuple[int, int]:
    """(bh, bw) in pixels: a mesh of ``mesh`` arcsec (default BACKGROUND_MESH_ARCSEC), at most the tile."""
    side = int(round((BACKGROUND_MESH_ARCSEC if mesh is None else float(mesh)) / tile.pixscale))
    h, w = tile.shape
    return max(1, min(side, h)), max(1, min(side, w))


_MAX_STAT_VALUES = 1_000_000


def _clipped_stats(values: np.ndarray) -> tuple[float, float]:
    """(mode, sigma) of ``values`` after iterative 3-sigma clipping about the median, with
    SExtractor's mode estimate (2.5 median - 1.5 mean; the median when the two disagree by more than
    0.3 sigma). At most a million values are used (evenly strided)."""
    d = np.asarray(values, np.float64).ravel()
    if d.size > _MAX_STAT_VALUES:
        d = d[:: int(np.ceil(d.size / _MAX_STAT_VALUES))]
    med, sd, mean = float(np.median(d)), float(d.std()), float(d.mean())
    for _ in range(20):
        if not sd > 0:
            break
        kept = d[np.abs(d - med) < 3.0 * sd]
        if kept.size == 0:
            break
        med, mean, new = float(np.median(kept)), float(kept.mean()), float(kept.std())
        done = abs(new - sd) <= 1e-4 * sd
        sd = new
        if done:
            break
    mode = med if not sd > 0 or abs(mean - med) > 0.3 * sd else 2.5 * med - 1.5 * mean
    return mode, sd


def _difference_sigma(image: np.ndarray, bad: np.ndarray, lag: int) -> float | None:
    """Pixel noise from differences of pixels ``lag`` apart along rows and columns (divided by
    sqrt 2, 3-sigma clipped): smooth light (a galaxy's outskirts, sky gradients) cancels, and a lag
    beyond the noise's correlation length keeps correlated noise at its full rms. None when fewer
    than 100 pairs have both pixels good."""
    parts = []
    for axis in (0, 1):
        n = image.shape[axis]
        if lag >= n:
            continue
        lo, hi = [slice(None)] * 2, [slice(None)] * 2
        lo[axis], hi[axis] = slice(0, n - lag), slice(lag, n)
        ok = ~(bad[tuple(lo)] | bad[tuple(hi)])
        parts.append((image[tuple(hi)][ok].astype(np.float64) - image[tuple(lo)][ok]) / np.sqrt(2.0))
    values = np.concatenate(parts) if parts else np.zeros(0)
    if values.size < 100:
        return None
    sigma = _clipped_stats(values)[1]
    return sigma if np.isfinite(sigma) and sigma > 0 else None


def sky_background(image: np.ndarray, exclude: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """sep's background (meshes ``box`` = (bh, bw) px, 3x3 median filter) of ``image`` leaving out
    ``exclude``; where every mesh is more than half excluded (sep then returns 0), the clipped mode
    of the pixels left, as a constant."""
    import sep

    bh, bw = box
    bkg = sep.Background(image, mask=exclude, bw=bw, bh=bh, fw=3, fh=3)
    if bkg.globalback == 0.0 and bkg.globalrms == 1.0 and (~exclude).any():  # sep: no usable mesh
        return np.full(image.shape, _clipped_stats(image[~exclude])[0], np.float32)
    return bkg.back(dtype=np.float32)


def detection_image(tile: Tile, bands: tuple[str, ...] | None = None, background_mesh: float | None = None,
                    exclude: np.ndarray | None = None):
    """(detection image, per-pixel 1-sigma error, mask, per-band background-subtracted images).

    The detection image is the inverse-variance weighted mean of the background-subtracted bands
    (weights: ``invvar`` when the tile has it, else 1/sigma^2 of each band's pixel noise from
    differences NOISE_LAG_ARCSEC apart). ``exclude`` (bool (H, W), e.g. grown detections) is left
    out of the sky and noise estimates.
    """
    use = tuple(tile.bands) if bands is None else tuple(bands)
    box = _background_box(tile, background_mesh)
    lag = max(1, int(round(NOISE_LAG_ARCSEC / tile.pixscale)))
    num = np.zeros(tile.shape, np.float64)
    wsum = np.zeros(tile.shape, np.float64)
    subtracted = {}
    for band in use:
        b = tile.band_index(band)
        img = np.ascontiguousarray(tile.image[b], dtype=np.float32)
        invalid = ~tile.valid[b]
        if invalid.all():
            continue
        skip = invalid if exclude is None else (invalid | exclude)
        if skip.all():
            skip = invalid
        sub = img - sky_background(img, skip, box)
        sub[invalid] = 0.0
        subtracted[band] = sub
        if tile.invvar is not None:
            weight = tile.invvar[b].astype(np.float64)
        else:
            sigma = _difference_sigma(img, skip, lag)
            if sigma is None:
                continue
            weight = np.where(invalid, 0.0, 1.0 / sigma**2)
        num += weight * sub
        wsum += weight
    if not subtracted:
        raise TileError(tile.path, "no valid pixels in the detection bands")
    mask = wsum <= 0
    det = np.where(mask, 0.0, num / np.where(mask, 1.0, wsum)).astype(np.float32)
    err = np.where(mask, 1.0, 1.0 / np.sqrt(np.where(mask, 1.0, wsum))).astype(np.float32)
    return det, err, mask, subtracted


def noise_correlation(det: np.ndarray, err: np.ndarray, mask: np.ndarray, kernel: np.ndarray, lag: int,
                      exclude: np.ndarray | None = None) -> float:
    """How much more noise the filtered detection image has than white noise of ``err`` would give.

    Coadds and resampled viewer cubes have pixel-to-pixel correlated noise, which the detection
    filter barely averages down; thresholds scaled by this factor (>= 1) keep the false-detection
    rate of white noise. Measured as the 3-sigma clipped rms of differences ``lag`` px apart of the
    filtered ``det / err`` (leaving out masked pixels, pixels the filter mixes with them, and
    ``exclude``), over the white-noise value of ``kernel``.
    """
    from scipy import ndimage

    significance = np.where(mask, 0.0, det / err)
    filtered = ndimage.convolve(significance, kernel / kernel.sum(), mode="nearest").astype(np.float32)
    bad = ndimage.binary_dilation(mask, iterations=max(1, kernel.shape[0] // 2)) if mask.any() else mask.copy()
    if exclude is not None:
        bad = bad | exclude
    if bad.all():
        return 1.0
    sigma = _difference_sigma(filtered, bad, lag)
    return max(1.0, sigma / _white(kernel)) if sigma is not None else 1.0


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


def detect_sources(tile: Tile, *, nsigma: float = 1.5, minarea: float = 5, deblend_nthresh: int = 32,
                   deblend_cont: float = 0.005, bands: tuple[str, ...] | None = None,
                   background_mesh: float | None = None, id_prefix: str | None = None) -> Table:
    """Detect sources with sep on the weighted band mean; every size is on the sky (docs/survey.md).

    ``nsigma``: threshold in units of the unfiltered pixel noise of the native 0.262"/px grid (as
    SExtractor there), i.e. ``nsigma / 0.375`` times the rms of the filtered detection image on any
    grid; ``minarea``: in native pixels (0.0686 arcsec^2 each); ``background_mesh``: arcsec
    (default BACKGROUND_MESH_ARCSEC). Detection runs in passes: each one leaves the sources of the
    previous one (grown by SOURCE_MASK_ARCSEC) out of the sky and noise estimates, until the source
    mask stops changing.

    ``x, y`` are windowed centroids (:func:`refine_centres`). Rows are sorted by (y, x) and named
    ``"{id_prefix}/det{i}"``; ``id_prefix`` defaults to ``tile.name``, which is not unique across
    folders (``embed`` passes the tile's key, a resolved path, so that its ids are). Columns besides
    the standard ones: ``flux`` (detection image) and ``flux_<band>`` (Kron, 2.5 Kron radii),
    nanomaggies (see :func:`flux_scale`),
    ``a``, ``b`` (px), ``theta`` (rad), ``npix``, ``peak``, ``flags`` (sep flags).
    """
    import sep
    from scipy import ndimage

    kernel = detection_kernel(tile.pixscale)
    relative = _white(kernel) / _white(DETECTION_KERNEL)
    minarea_px = max(1, int(round(native_area(tile.pixscale, minarea))))
    lag = max(kernel.shape[0], int(round(FILTERED_NOISE_LAG_ARCSEC / tile.pixscale)))
    grow = int(np.ceil(SOURCE_MASK_ARCSEC / tile.pixscale))
    h, w = tile.shape
    sep.set_extract_pixstack(max(sep.get_extract_pixstack(), h * w // 8))
    exclude = None
    for npass in range(1, DETECTION_PASSES + 1):
        det, err, mask, subtracted = detection_image(tile, bands, background_mesh, exclude)
        correlation = noise_correlation(det, err, mask, kernel, lag, exclude)
        try:
            objs, seg = sep.extract(det, nsigma, err=err * np.float32(correlation * relative), mask=mask,
                                    minarea=minarea_px, filter_kernel=kernel, filter_type="conv",
                                    deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont,
                                    segmentation_map=True)
        except Exception as e:  # sep raises plain Exception on buffer overflows
            raise TileError(tile.path, f"source detection failed ({_first_line(e)})") from None
        if len(objs) == 0 or npass == DETECTION_PASSES:
            break
        grown = ndimage.maximum_filter((seg > 0).view(np.uint8), size=2 * grow + 1) > 0
        changed = int(np.count_nonzero(grown)) if exclude is None else int(np.count_nonzero(grown ^ exclude))
        exclude = grown
        if npass > 1 and changed <= MASK_CHANGE_STOP * h * w:
            break
    excluded = 0.0 if exclude is None else float(exclude.mean())
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
        floor = native_length(tile.pixscale, 0.5)  # half a native pixel, 0.131"
        a = np.maximum(np.asarray(out["a"]), floor)
        b = np.maximum(np.asarray(out["b"]), floor)
        theta = np.asarray(out["theta"], np.float64)
        # Kron radius (first moment within 6 a) and aperture (2.5 Kron radii, at least 1.75) are in
        # units of a, b: the same on any grid
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
                             "noise_correlation": correlation, "flux_scale": scale, "passes": npass,
                             "excluded_fraction": excluded, "minarea_px": minarea_px,
                             "filter_px": int(kernel.shape[0]), "background_box_px": list(_background_box(tile, background_mesh))}
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
