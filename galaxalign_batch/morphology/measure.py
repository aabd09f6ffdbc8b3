"""Non-parametric morphology of each source with statmorph, on a single-band postage stamp.

Per source (see docs/morphology.md):

1. a square stamp of the band (default r) is cut from the tile around ``(x, y)`` (pixels outside
   the tile or without coverage are masked), with its 1-sigma noise map: ``1/sqrt(invvar)``, or for
   tiles without inverse variances (viewer cubes) sep's global background rms of the band;
2. a segmentation map of the stamp with photutils: the stamp smoothed by a Gaussian of
   ``smooth_fwhm_px``, pixels above ``nsigma`` x noise in groups of >= ``npixels``
   (``detect_sources``), deblended like SExtractor (``deblend_sources``, 32 levels, contrast
   0.005); the target is the segment under ``(x, y)`` (or the nearest one within ``centre_tolerance_px``).
   The other segments, grown by ``neighbour_dilation_px``, are masked (statmorph masks the
   segments themselves; growing them also hides part of the neighbours' fainter wings);
3. when 2.5 x the segment's extent (statmorph's cutout) does not fit, the stamp is cut again
   larger (up to ``max_stamp_px``);
4. ``statmorph.SourceMorphology`` with the noise map as weight map and, when a PSF FWHM is known, a
   Moffat (beta = 3) PSF for the Sersic fit.

Radii are converted to arcsec with the tile's pixel scale. statmorph's ``flag`` (0 good, 1 suspect,
2 bad, 4 catastrophic) and ``flag_sersic`` are kept; a source that cannot be measured at all gets
flag 4, NaNs and a one-line ``error``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

#: statmorph attributes copied per source (radii converted to arcsec)
STATMORPH_VALUES = ("concentration", "asymmetry", "smoothness", "gini", "m20", "sersic_n", "sersic_ellip",
                    "sn_per_pixel", "ellipticity_asymmetry")
STATMORPH_RADII = ("rpetro_circ", "rhalf_circ", "rhalf_ellip", "sersic_rhalf")
#: every numeric column of a measurement row, in table order
MEASURED_COLUMNS = ("concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ", "rhalf_circ",
                    "rhalf_ellip", "sersic_n", "sersic_rhalf", "sersic_ellip", "sersic_rhalf_circ",
                    "ellipticity_asymmetry", "sn_per_pixel")
FLAG_CATASTROPHIC = 4
DEFAULT_PSF_FWHM_ARCSEC = 1.3  # typical DECaLS r-band seeing, when nothing better is known
PSF_BETA = 3.0


@dataclass(frozen=True)
class MorphologyConfig:
    """How stamps are cut and segmented (see the module docstring)."""

    band: str = "r"
    stamp_px: int = 96
    max_stamp_px: int = 400
    nsigma: float = 1.5
    npixels: int = 5
    smooth_fwhm_px: float = 2.0
    deblend_levels: int = 32
    deblend_contrast: float = 0.005
    centre_tolerance_px: float = 3.0
    neighbour_dilation_px: int = 5  # other sources' segments are grown by this much before masking
    cutout_extent: float = 2.5  # statmorph's default

    def as_dict(self) -> dict:
        return asdict(self)


def moffat_psf(fwhm_arcsec: float, pixscale: float, beta: float = PSF_BETA) -> np.ndarray:
    """A pixel-integrated Moffat PSF image (odd side, unit sum) drawn with galsim."""
    import galsim

    half = int(math.ceil(4.0 * fwhm_arcsec / pixscale))
    size = 2 * max(half, 5) + 1
    img = galsim.Moffat(beta=beta, fwhm=fwhm_arcsec).drawImage(nx=size, ny=size, scale=pixscale).array
    return (img / img.sum()).astype(np.float64)


def cut_stamp(image: np.ndarray, noise: np.ndarray, valid: np.ndarray, x: float, y: float, size: int):
    """``(image, noise, mask, x0, y0)``: a ``size`` x ``size`` stamp around pixel ``(x, y)``, zero-padded and
    masked outside the tile or without coverage; ``(x0, y0)`` is the stamp's origin in the tile."""
    h, w = image.shape
    x0 = int(math.floor(x + 0.5)) - size // 2
    y0 = int(math.floor(y + 0.5)) - size // 2
    img = np.zeros((size, size), np.float64)
    sig = np.ones((size, size), np.float64)
    ok = np.zeros((size, size), bool)
    ys, ye = max(y0, 0), min(y0 + size, h)
    xs, xe = max(x0, 0), min(x0 + size, w)
    if ys < ye and xs < xe:
        sl = (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
        img[sl] = image[ys:ye, xs:xe]
        sig[sl] = noise[ys:ye, xs:xe]
        ok[sl] = valid[ys:ye, xs:xe]
    ok &= np.isfinite(img) & np.isfinite(sig) & (sig > 0)
    img[~ok] = 0.0
    sig[~ok] = 1.0
    return img, sig, ~ok, x0, y0


def segment(image: np.ndarray, noise: np.ndarray, mask: np.ndarray, cfg: MorphologyConfig):
    """photutils segmentation of a stamp (None when nothing is above the threshold)."""
    from photutils.segmentation import deblend_sources, detect_sources
    from scipy import ndimage

    # Gaussian smoothing of the masked-as-zero stamp (no interpolation into masked regions)
    smoothed = ndimage.gaussian_filter(np.where(mask, 0.0, image), cfg.smooth_fwhm_px / 2.3548, mode="constant")
    threshold = cfg.nsigma * noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NoDetectionsWarning: an empty stamp is reported as a row
        segm = detect_sources(smoothed, threshold, cfg.npixels, mask=mask)
        if segm is None:
            return None
        segm = deblend_sources(smoothed, segm, cfg.npixels, n_levels=cfg.deblend_levels, contrast=cfg.deblend_contrast,
                               progress_bar=False)
    return segm


def target_label(segm, cx: float, cy: float, tolerance: float) -> int:
    """The segment under pixel ``(cx, cy)``, else the nearest within ``tolerance`` px; 0 when none."""
    data = segm.data
    h, w = data.shape
    ix, iy = int(math.floor(cx + 0.5)), int(math.floor(cy + 0.5))
    if 0 <= ix < w and 0 <= iy < h and data[iy, ix] > 0:
        return int(data[iy, ix])
    r = int(math.ceil(tolerance))
    y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, h), max(ix - r, 0), min(ix + r + 1, w)
    sub = data[y0:y1, x0:x1]
    if not (sub > 0).any():
        return 0
    yy, xx = np.nonzero(sub)
    d = np.hypot(xx + x0 - cx, yy + y0 - cy)
    k = int(np.argmin(d))
    return int(sub[yy[k], xx[k]]) if d[k] <= tolerance else 0


def _needed_size(segm, label: int, cx: float, cy: float, extent: float, size: int) -> int:
    """Stamp side (centred on the source) that holds statmorph's cutout of the segment, or ``size`` if it fits.

    statmorph cuts ``extent`` x the segment's bounding box around the box centre (``_slice_stamp``).
    """
    ys, xs = segm.slices[segm.get_index(label)]
    dx, dy = xs.stop - xs.start, ys.stop - ys.start
    xc, yc = xs.start + dx // 2, ys.start + dy // 2
    dist = int(max(dx, dy) * extent / 2.0)
    if xc - dist >= 0 and yc - dist >= 0 and xc + dist <= size and yc + dist <= size:
        return size
    half = max(abs(xc - cx), abs(yc - cy)) + dist + 2
    return int(2 * math.ceil(half) + 1)


def empty_row(error: str) -> dict:
    row = {c: np.nan for c in MEASURED_COLUMNS}
    row.update(flag=FLAG_CATASTROPHIC, flag_sersic=FLAG_CATASTROPHIC, stamp_px=0, error=error)
    return row


def measure_stamp(image: np.ndarray, noise: np.ndarray, mask: np.ndarray, cx: float, cy: float, pixscale: float,
                  cfg: MorphologyConfig = MorphologyConfig(), psf: np.ndarray | None = None, segm=None) -> dict:
    """statmorph measurements of the source at stamp pixel ``(cx, cy)`` (radii in arcsec); see module docs.

    ``noise``: 1-sigma per pixel; ``mask``: True where a pixel is not to be used; ``segm``: a ready
    photutils segmentation of the stamp (made here when None).
    """
    import statmorph

    if segm is None:
        segm = segment(image, noise, mask, cfg)
    if segm is None:
        return empty_row("nothing above the detection threshold in the stamp")
    label = target_label(segm, cx, cy, cfg.centre_tolerance_px)
    if label == 0:
        return empty_row(f"no segment within {cfg.centre_tolerance_px:g} px of the source position")
    others = (segm.data > 0) & (segm.data != label)
    if cfg.neighbour_dilation_px > 0 and others.any():
        from scipy import ndimage

        others = ndimage.binary_dilation(others, iterations=int(cfg.neighbour_dilation_px)) & (segm.data != label)
    mask = mask | others
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = statmorph.SourceMorphology(image, segm, label, mask=mask, weightmap=noise, psf=psf,
                                           cutout_extent=cfg.cutout_extent)
        except Exception as e:  # statmorph raises assorted errors on degenerate input
            return empty_row(f"statmorph failed ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
        row = {}
        for name in STATMORPH_VALUES:
            row[name] = _float(getattr(m, name, np.nan))
        for name in STATMORPH_RADII:
            row[name] = _float(getattr(m, name, np.nan)) * pixscale
        row["flag"] = int(m.flag)
        row["flag_sersic"] = int(m.flag_sersic)
    e = row["sersic_ellip"]
    row["sersic_rhalf_circ"] = row["sersic_rhalf"] * math.sqrt(1.0 - e) if np.isfinite(e) and 0 <= e < 1 else np.nan
    row["error"] = ""
    return row


def _float(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def band_noise(tile, band_index: int) -> np.ndarray:
    """Per-pixel 1-sigma noise of a band: ``1/sqrt(invvar)``, else sep's global background rms (viewer cubes)."""
    valid = tile.valid[band_index]
    if tile.invvar is not None:
        iv = tile.invvar[band_index].astype(np.float64)
        with np.errstate(divide="ignore"):
            return np.where(valid & (iv > 0), 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), 1.0)
    import sep

    img = np.ascontiguousarray(tile.image[band_index], dtype=np.float32)
    rms = float(sep.Background(img, mask=~valid).globalrms)
    if not (np.isfinite(rms) and rms > 0):
        rms = float(np.std(img[valid])) if valid.any() else 1.0
    return np.full(img.shape, rms, np.float64)


def measure_source(image, noise, valid, x: float, y: float, pixscale: float, cfg: MorphologyConfig,
                   psf: np.ndarray | None) -> dict:
    """Measure the source at tile pixel ``(x, y)``, growing the stamp until statmorph's cutout fits."""
    t0 = time.perf_counter()
    size = cfg.stamp_px | 1
    while True:
        stamp, sig, mask, x0, y0 = cut_stamp(image, noise, valid, x, y, size)
        cx, cy = x - x0, y - y0
        segm = segment(stamp, sig, mask, cfg)
        label = 0 if segm is None else target_label(segm, cx, cy, cfg.centre_tolerance_px)
        if label == 0 or size >= cfg.max_stamp_px:
            break
        need = _needed_size(segm, label, cx, cy, cfg.cutout_extent, size)
        if need <= size:
            break
        size = min(max(need, int(1.5 * size)) | 1, cfg.max_stamp_px | 1)
    if mask.all():
        row = empty_row("no coverage at the source")
    else:
        row = measure_stamp(stamp, sig, mask, cx, cy, pixscale, cfg, psf, segm=segm)
    row["stamp_px"] = size
    row["seconds"] = time.perf_counter() - t0
    return row
