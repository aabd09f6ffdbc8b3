"""`make_cutouts`: batched fixed-angular-size cutouts of many sources from one multi-band image."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
from dataclasses import dataclass

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.preprocess import kernels
from galaxalign_batch.preprocess.spec import CutoutSpec
from galaxalign_batch.survey.layout import BANDS

log = logging.getLogger(__name__)

_MODES = {"none": kernels.MODE_NONE, "lupton": kernels.MODE_LUPTON, "asinh": kernels.MODE_ASINH,
          "gz-decals": kernels.MODE_GZ}
# Legacy Survey bricks and viewer cubes: RA increases to -x (CD1_1 < 0), Dec to +y (CD2_2 > 0); north up,
# east left is then a flip of the rows. M maps output offsets (column a, row b) to grid offsets (dx, dy).
_FITS = (1, 0, 0, 1)
_LEGACY_SURVEY_NORTH_UP = (1, 0, 0, -1)
# a WCS within this many output pixels (at the cutout's corners) of one of the 8 flips / quarter turns is
# cut by the exact separable path with that flip; beyond it, on the rotated grid
ROTATION_TOLERANCE_PX = 0.1
_NO_VALID = np.ones((1, 1, 1), dtype=np.bool_)
_NO_BLOCKS = np.zeros((1, 1, 1), dtype=np.bool_)
_warm = False
_warm_lock = threading.Lock()


@dataclass(frozen=True)
class CutoutBatch:
    """``pixels`` (N, 3, S, S) in ``spec.dtype``; ``masked_fraction`` (N,) float32 in [0, 1]."""

    pixels: np.ndarray
    masked_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.masked_fraction)


def make_cutouts(
    image: np.ndarray,
    valid: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    pixscale: float,
    spec: CutoutSpec,
    bands: tuple[str, ...] = BANDS,
    wcs=None,
) -> CutoutBatch:
    """Cutouts of ``spec.angular_size`` arcsec centred on (x, y), resampled to ``spec.out_size`` px.

    ``image``: (nb, H, W) nanomaggies (float32; other float dtypes are converted); ``valid``: (nb, H, W)
    bool or None (all valid; non-finite pixels are always treated as invalid); ``x``, ``y``: 0-based
    pixel centres (column, row); ``pixscale``: arcsec per pixel of ``image``; ``bands``: the band of
    each image plane; ``wcs``: the image's celestial astropy WCS, or None for the Legacy Survey
    convention (RA increasing to -x, Dec to +y, as every brick and viewer cube). The output image
    centre maps exactly to (x, y). With ``spec.orientation == "north-up"`` row 0 is north and column 0
    east (derived per source from ``wcs``: either sign of CD1_1 / CD2_2, transposed or rotated axes);
    with ``"fits"`` rows follow +y and columns +x of ``image``.
    """
    if not isinstance(spec, CutoutSpec):
        raise ConfigError(f"spec must be a CutoutSpec, got {type(spec).__name__}")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ConfigError(f"image must be (bands, H, W), got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ConfigError(f"image must hold floating-point nanomaggies, got dtype {image.dtype}")
    bands = tuple(bands)
    if image.shape[0] != len(bands):
        raise ConfigError(f"image has {image.shape[0]} planes but {len(bands)} bands were named: {bands}")
    planes, p1, p2 = spec.band_parameters(bands)
    if valid is not None:
        valid = np.asarray(valid)
        if valid.shape != image.shape:
            raise ConfigError(f"valid mask shape {valid.shape} differs from image shape {image.shape}")
        valid = np.ascontiguousarray(valid, dtype=np.bool_)
    if isinstance(pixscale, bool) or not isinstance(pixscale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(pixscale) or pixscale <= 0:
        raise ConfigError(f"pixscale must be a finite number of arcsec per pixel > 0, got {pixscale!r}")
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.ascontiguousarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ConfigError(f"x and y must be 1-D arrays of equal length, got shapes {xs.shape} and {ys.shape}")
    bad = ~(np.isfinite(xs) & np.isfinite(ys))
    if bad.any():
        raise ConfigError(f"{int(bad.sum())} of {len(xs)} source positions are not finite (first at index {int(np.argmax(bad))})")
    image = np.ascontiguousarray(image, dtype=np.float32)
    orient, rotated, rot = orientation(spec, wcs, xs, ys, float(pixscale))
    _ensure_warm()
    return _run(image, valid, xs, ys, float(pixscale), spec, planes, p1, p2, orient, rotated, rot)


def sky_jacobian(wcs, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 2, 2) d(east, north) / d(x, y) at each 0-based pixel, in degrees of arc per pixel.

    Central differences of ``wcs.all_pix2world`` over one pixel; east = dRA cos(Dec) (RA wrapped).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    px = np.concatenate([x + 0.5, x - 0.5, x, x])
    py = np.concatenate([y, y, y + 0.5, y - 0.5])
    try:
        ra, dec = wcs.all_pix2world(px, py, 0)
    except Exception as e:
        raise ConfigError(f"cannot evaluate the WCS at the sources ({e})") from None
    ra = np.asarray(ra).reshape(4, -1)
    dec = np.asarray(dec).reshape(4, -1)
    cosd = np.cos(np.radians(np.asarray(wcs.all_pix2world(x, y, 0))[1]))

    def east(a, b):
        return ((ra[a] - ra[b] + 180.0) % 360.0 - 180.0) * cosd

    jac = np.empty((len(x), 2, 2))
    jac[:, 0, 0], jac[:, 1, 0] = east(0, 1), dec[0] - dec[1]
    jac[:, 0, 1], jac[:, 1, 1] = east(2, 3), dec[2] - dec[3]
    return jac


def orientation(spec: CutoutSpec, wcs, x: np.ndarray, y: np.ndarray, pixscale: float):
    """Per source: (orient (N, 4) int64 signed permutations, rotated (N,) bool, rot (N, 2, 2) float64).

    The output offset (a = column, b = row, in output pixels from the centre) of a north-up, east-left
    picture is the sky offset (east, north) = (-a, -b); the input pixel offset is then
    ``step * J (-a, -b)`` with J = d(x, y) / d(east, north) scaled to |det J| = 1. Where ``-J`` is within
    ``ROTATION_TOLERANCE_PX`` (at the corners) of a signed permutation the kernel uses it (exact);
    otherwise it resamples on the rotated grid ``-step J``.
    """
    n = len(x)
    rotated = np.zeros(n, np.bool_)
    rot = np.zeros((n, 2, 2), np.float64)
    if spec.orientation == "fits" or wcs is None:
        code = _FITS if spec.orientation == "fits" else _LEGACY_SURVEY_NORTH_UP
        return np.tile(np.asarray(code, np.int64), (n, 1)), rotated, rot
    if n == 0:
        return np.zeros((0, 4), np.int64), rotated, rot
    k = sky_jacobian(wcs, x, y)
    det = np.linalg.det(k)
    if not np.all(np.isfinite(det)) or np.any(det == 0):
        raise ConfigError("the WCS is singular or not finite at some sources: cannot orient the cutouts")
    j = np.linalg.inv(k)
    j /= np.sqrt(np.abs(np.linalg.det(j)))[:, None, None]
    mn = -j  # output offset (a, b) -> input offset in units of step
    diagonal = np.abs(mn[:, 0, 0]) + np.abs(mn[:, 1, 1]) >= np.abs(mn[:, 0, 1]) + np.abs(mn[:, 1, 0])
    perm = np.zeros((n, 2, 2))
    perm[diagonal, 0, 0] = np.sign(mn[diagonal, 0, 0])
    perm[diagonal, 1, 1] = np.sign(mn[diagonal, 1, 1])
    perm[~diagonal, 0, 1] = np.sign(mn[~diagonal, 0, 1])
    perm[~diagonal, 1, 0] = np.sign(mn[~diagonal, 1, 0])
    half = (spec.out_size - 1) / 2.0
    corners = np.array([[half, half], [half, -half]])
    off = np.einsum("nij,cj->nci", mn - perm, corners)
    worst = np.sqrt((off ** 2).sum(axis=2)).max(axis=1)
    rotated = worst > ROTATION_TOLERANCE_PX
    rot = spec.step(pixscale) * mn
    return perm.reshape(n, 4).astype(np.int64), rotated, rot


@contextlib.contextmanager
def _keep_torch_threads():
    """Numba's OpenMP layer shares libgomp with torch and sets its thread count on every parallel
    launch, so a process that set ``torch.set_num_threads(1)`` would find it back at all cores
    after a cutout (measured: 1 -> 2 here; 4x slower training under load). Put it back."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _run(image, valid, xs, ys, pixscale, spec, planes, p1, p2, orient, rotated, rot) -> CutoutBatch:
    with _keep_torch_threads():
        return _run_kernels(image, valid, xs, ys, pixscale, spec, planes, p1, p2, orient, rotated, rot)


def _run_kernels(image, valid, xs, ys, pixscale, spec, planes, p1, p2, orient, rotated, rot) -> CutoutBatch:
    mode = _MODES[spec.stretch]
    m, q = spec.lupton_m, spec.lupton_q
    if mode == kernels.MODE_ASINH:  # the kernel divides by asinh(max / softening)
        p2 = [math.asinh(mx / soft) for soft, mx in zip(p1, p2)]
    elif mode == kernels.MODE_GZ:  # black point, 1 / range after the asinh; p2[0] > 0: desaturate
        m = math.asinh(spec.gz_min)
        q = 1.0 / (math.asinh(spec.gz_max) - m)
        p2 = [1.0 if spec.gz_desaturate else 0.0] * len(p1)
    step = spec.step(pixscale)
    size = spec.out_size
    to_uint8 = spec.dtype == "uint8"
    out = np.zeros((len(xs), 3, size, size), dtype=np.uint8 if to_uint8 else np.float32)
    masked = np.empty(len(xs), dtype=np.float64)
    ntaps = kernels.taps_per_axis(step)
    # a map of invalid blocks pays off when the windows to check add up to more than the image
    use_blocks = valid is not None and len(xs) * ((size - 1) * step + ntaps) ** 2 > image.shape[1] * image.shape[2]
    if len(xs):
        kernels.cutout_kernel(
            image, _NO_VALID if valid is None else valid, valid is not None,
            kernels.invalid_blocks(valid) if use_blocks else _NO_BLOCKS, use_blocks, xs, ys,
            np.argsort(ys, kind="stable"), step, ntaps, mode,
            np.asarray(planes, np.int64), np.asarray(p1, np.float64), np.asarray(p2, np.float64),
            m, q, spec.fill, to_uint8, np.ascontiguousarray(orient, np.int64), np.ascontiguousarray(rotated, np.bool_),
            np.ascontiguousarray(rot, np.float64), out, masked,
        )
    if spec.dtype == "float16":
        out = out.astype(np.float16)
    return CutoutBatch(pixels=out, masked_fraction=masked.astype(np.float32))


def _ensure_warm() -> None:
    if not _warm:
        warmup()


def warmup() -> None:
    """Compile (or load from the Numba cache) the kernels for float32 and uint8 outputs, once per process."""
    global _warm
    with _warm_lock:
        if _warm:
            return
        image = np.zeros((3, 8, 8), np.float32)
        valid = np.ones((3, 8, 8), np.bool_)
        xy = np.array([3.5])
        for dtype in ("float32", "uint8"):
            spec = CutoutSpec(angular_size=2.0, out_size=4, dtype=dtype)
            planes, p1, p2 = spec.band_parameters(BANDS)
            _run(image, valid, xy, xy, 1.0, spec, planes, p1, p2, *orientation(spec, None, xy, xy, 1.0))
        _warm = True
        log.debug("preprocess kernels ready")
