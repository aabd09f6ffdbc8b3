"""The :class:`Tile`: one survey image (a Legacy Survey brick or a viewer cutout cube) in memory.

Also the pieces every reader shares: opening a FITS file safely (existence, FITS signature,
truncation), turning a FITS header into a celestial WCS, and the coverage rule that builds
``valid`` (see ``docs/survey.md``).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from galaxalign_batch.errors import TileError

log = logging.getLogger(__name__)

#: exact zeros in a 4-connected region of at least this many pixels are "no coverage", not sky
MIN_ZERO_REGION = 8

#: header keys copied into ``Tile.header`` when present (first spelling wins for aliases)
HEADER_KEYS = ("BRICKNAME", "BRICKNAM", "BRICK", "BRICKID", "RELEASE", "SURVEY", "VERSION", "DRVERSIO",
               "LEGPIPEV", "IMAGETYP", "BANDS", "RA", "DEC", "RA_CENTER", "DEC_CENTER", "BUNIT", "MAGZERO")

FITS_BLOCK = 2880
GZIP_MAGIC = b"\x1f\x8b"

#: The most pixels (all planes together) an image HDU may declare before it is read: 2**28
#: (268 million pixels, 1 GiB as float32; a full Legacy Survey brick band is 13 million). Checked
#: against the header, before any pixel is allocated, so that a file declaring 3 x 30000 x 30000
#: (a compressed one can be small) is refused instead of making a worker allocate 10 GiB.
#: ``GALAXALIGN_MAX_IMAGE_PIXELS`` or ``embed --max-image-pixels`` change it (:func:`set_max_image_pixels`).
DEFAULT_MAX_IMAGE_PIXELS = 1 << 28


def _default_max_image_pixels() -> int:
    return int(os.environ.get("GALAXALIGN_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))


_max_image_pixels = _default_max_image_pixels()


@dataclass
class Tile:
    """One image of the survey, all bands on one pixel grid.

    ``image`` is float32 ``(bands, H, W)`` in nanomaggies with invalid pixels set to 0; ``valid``
    marks covered, finite pixels; ``wcs`` is the 2-D celestial WCS (0-based pixel helpers below).
    """

    name: str
    path: str
    kind: Literal["brick", "cube"]
    bands: tuple[str, ...]
    image: np.ndarray
    valid: np.ndarray
    wcs: WCS
    invvar: np.ndarray | None = None
    maskbits: np.ndarray | None = None
    header: dict = field(default_factory=dict)
    pixscale: float = field(init=False)

    def __post_init__(self) -> None:
        self.bands = tuple(self.bands)
        if self.image.ndim != 3 or self.image.shape[0] != len(self.bands):
            raise ValueError(f"image must be (bands={len(self.bands)}, H, W), got {self.image.shape}")
        if self.valid.shape != self.image.shape or self.valid.dtype != np.bool_:
            raise ValueError("valid must be a bool array shaped like image")
        if self.invvar is not None and self.invvar.shape != self.image.shape:
            raise ValueError("invvar must be shaped like image")
        if self.maskbits is not None and self.maskbits.shape != self.image.shape[1:]:
            raise ValueError("maskbits must be (H, W)")
        if self.wcs.naxis != 2 or not self.wcs.has_celestial:
            raise ValueError("wcs must be a 2-D celestial WCS")
        self.pixscale = float(np.mean(proj_plane_pixel_scales(self.wcs)) * 3600.0)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.image.shape[1], self.image.shape[2]

    def band_index(self, band: str) -> int:
        try:
            return self.bands.index(band)
        except ValueError:
            raise KeyError(f"{self.name} has no band {band!r} (bands {''.join(self.bands)})") from None

    def pixel_to_world(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel (x = column, y = row) -> (ra, dec) float64 degrees (scalars for scalars)."""
        ra, dec = self.wcs.all_pix2world(np.asarray(x, np.float64), np.asarray(y, np.float64), 0)
        return np.asarray(ra, np.float64)[()], np.asarray(dec, np.float64)[()]

    def world_to_pixel(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) degrees -> 0-based pixel (x, y) float64."""
        x, y = self.wcs.all_world2pix(np.asarray(ra, np.float64), np.asarray(dec, np.float64), 0)
        return np.asarray(x, np.float64)[()], np.asarray(y, np.float64)[()]

    def contains(self, x, y) -> np.ndarray:
        """True where the 0-based pixel position lies on the image (pixel centres span -0.5 .. size-0.5)."""
        h, w = self.shape
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)

    def coverage_fraction(self, band: str | None = None) -> float:
        """Fraction of valid pixels: of one band, or over all bands together."""
        v = self.valid if band is None else self.valid[self.band_index(band)]
        return float(v.mean()) if v.size else 0.0

    def __repr__(self) -> str:
        h, w = self.shape
        return (f"Tile({self.name!r}, kind={self.kind}, bands={''.join(self.bands)}, {w}x{h} px, "
                f"{self.pixscale:.3f}\"/px, coverage {self.coverage_fraction():.3f})")


# --- shared reader pieces ------------------------------------------------------------------------

def check_fits_file(path: str | os.PathLike) -> Path:
    """Existence, FITS signature and size checks done before any reader touches the data."""
    p = Path(path)
    if not p.exists():
        raise TileError(p, "file does not exist")
    if not p.is_file():
        raise TileError(p, "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise TileError(p, "empty file (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(30)
    if head.startswith(GZIP_MAGIC):  # a whole-file gzip (.fits.gz): the signature is inside
        try:
            with gzip.open(p, "rb") as fh:
                head = fh.read(30)
        except (OSError, EOFError) as e:
            raise TileError(p, f"cannot read gzip file ({_first_line(e)})") from None
    if not head.startswith(b"SIMPLE  =") or head[29:30] != b"T":
        raise TileError(p, "not a FITS file (no 'SIMPLE = T' card at the start)")
    return p


def _fits_size(p: Path) -> int:
    """Bytes of FITS data in ``p``: the file size, or the decompressed size of a gzip file (a truncated
    gzip stream is a TileError)."""
    with open(p, "rb") as fh:
        gz = fh.read(2) == GZIP_MAGIC
    if not gz:
        return p.stat().st_size
    size = 0
    try:
        with gzip.open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                size += len(block)
    except (OSError, EOFError) as e:
        raise TileError(p, f"truncated or corrupt gzip file ({_first_line(e)})") from None
    return size


def open_fits(path: str | os.PathLike):
    """A ``fitsio.FITS`` handle after checking that every HDU's data lies inside the file.

    fitsio (cfitsio) happily opens a truncated file and astropy only warns before returning a
    short buffer; comparing each HDU's declared data end with the file size catches it first.
    """
    import fitsio

    p = check_fits_file(path)
    size = _fits_size(p)
    try:
        f = fitsio.FITS(str(p))
    except OSError as e:
        raise TileError(p, f"cannot read FITS file ({_first_line(e)})") from None
    try:
        expected = max(int(hdu.get_info()["data_end"]) for hdu in f)
    except OSError as e:
        f.close()
        raise TileError(p, f"cannot read FITS file ({_first_line(e)})") from None
    if size < expected:
        f.close()
        raise TileError(p, f"truncated FITS file (expected {expected} bytes, found {size})")
    if size % FITS_BLOCK:  # e.g. cut inside a later header, which cfitsio then does not list
        f.close()
        raise TileError(p, f"truncated FITS file ({size} bytes is not a whole number of {FITS_BLOCK}-byte blocks)")
    return f


def set_max_image_pixels(n: int | None) -> int:
    """Set the declared-size limit of image HDUs (None: ``GALAXALIGN_MAX_IMAGE_PIXELS`` or the default);
    returns the previous value."""
    global _max_image_pixels
    if n is not None and (isinstance(n, bool) or int(n) < 1):
        raise ValueError(f"the image size limit must be a positive number of pixels, got {n!r}")
    old, _max_image_pixels = _max_image_pixels, int(n) if n is not None else _default_max_image_pixels()
    return old


def max_image_pixels() -> int:
    return _max_image_pixels


def check_declared_size(path: str | os.PathLike, f, ext: int) -> None:
    """TileError when HDU ``ext`` declares more pixels than :func:`max_image_pixels` (header only)."""
    info = f[ext].get_info()
    dims = [int(d) for d in (info.get("dims") or [])]
    if not dims:
        return
    n = 1
    for d in dims:
        n *= max(d, 0)
    if n > _max_image_pixels:
        shape = " x ".join(str(d) for d in dims)
        raise TileError(path, f"HDU {ext} declares a {shape} image ({n:,} pixels), more than the limit of "
                              f"{_max_image_pixels:,} (raise it with --max-image-pixels or "
                              f"GALAXALIGN_MAX_IMAGE_PIXELS if this image is real)")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


_WCSLIB_WHERE = re.compile(r"ERROR \d+ in \w+\(\) at line \d+ of file \S+:?\s*")


def _wcs_reason(e: BaseException) -> str:
    """wcslib's message without its source location, on one line."""
    text = _WCSLIB_WHERE.sub("", " ".join(str(e).split())).strip()
    return text or type(e).__name__


def read_hdu(path: str | os.PathLike, f, ext: int) -> tuple[np.ndarray, fits.Header]:
    """Pixels (native byte order) and a clean astropy header of HDU ``ext`` of an open fitsio file.

    The HDU's declared size is checked against :func:`max_image_pixels` before anything is read.
    """
    check_declared_size(path, f, ext)
    try:
        data = f[ext].read()
        raw = f[ext].read_header()
    except (OSError, ValueError) as e:
        raise TileError(path, f"cannot read HDU {ext} ({_first_line(e)})") from None
    if data is None:
        raise TileError(path, f"HDU {ext} has no image data")
    return np.asarray(data).astype(data.dtype.newbyteorder("="), copy=False), _clean_header(raw)


def read_header(path: str | os.PathLike, f, ext: int) -> fits.Header:
    """The clean astropy header of HDU ``ext`` of an open fitsio file, without reading its pixels."""
    try:
        raw = f[ext].read_header()
    except (OSError, ValueError) as e:
        raise TileError(path, f"cannot read HDU {ext} ({_first_line(e)})") from None
    return _clean_header(raw)


def _clean_header(raw) -> fits.Header:
    """A fitsio header as an astropy header, without structural / tile-compression keywords."""
    raw.clean()  # drop structural / tile-compression keywords (BINTABLE, ZNAXIS, ...)
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rec in raw.records():
            name = rec.get("name")
            if not name or name in ("COMMENT", "HISTORY", "CONTINUE"):
                continue
            try:
                header[name] = (rec.get("value"), rec.get("comment") or "")
            except (ValueError, TypeError):
                pass  # a card astropy will not take; not needed for the WCS
    return header


def image_hdu_index(path: str | os.PathLike, f) -> int:
    """The first HDU holding an image (the primary for plain files, HDU 1 for fpack files)."""
    for i, hdu in enumerate(f):
        info = hdu.get_info()
        if info["hdutype"] == 0 and info.get("ndims", 0) >= 2 and all(d > 0 for d in info.get("dims", [])):
            return i
    raise TileError(path, "no image HDU with data (empty image or zero-size axes)")


def celestial_wcs(path: str | os.PathLike, header: fits.Header, shape: tuple[int, int]) -> WCS:
    """The 2-D celestial WCS of ``header`` for an image of ``shape`` = (H, W); TileError if unusable."""
    if not any(k in header for k in ("CTYPE1", "CTYPE2")):
        raise TileError(path, "header has no usable WCS (no CTYPE1/CTYPE2)")
    if not any(k in header for k in ("CD1_1", "CD2_2", "CDELT1", "CDELT2", "PC1_1")):
        raise TileError(path, "header has no usable WCS (no CD matrix or CDELT pixel scale)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long comments of other cards
            w = WCS(header, naxis=2, fix=True)
    except Exception as e:  # astropy raises several types for broken WCS headers
        raise TileError(path, f"header has no usable WCS ({_wcs_reason(e)})") from None
    if not w.has_celestial or w.celestial.naxis != 2 or w.wcs.lng != 0 or w.wcs.lat != 1:
        ctypes = "/".join(w.wcs.ctype)
        raise TileError(path, f"header has no usable WCS (not celestial on axes 1,2: CTYPE {ctypes})")
    scale = proj_plane_pixel_scales(w)
    det = np.linalg.det(w.pixel_scale_matrix)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0) or not np.isfinite(det) or det == 0:
        raise TileError(path, "header has no usable WCS (singular or non-finite pixel scale)")
    w.pixel_shape = (shape[1], shape[0])
    return w


def zero_regions(band_image: np.ndarray, min_pixels: int = MIN_ZERO_REGION) -> np.ndarray:
    """True on exact zeros that belong to a 4-connected zero region of at least ``min_pixels``.

    Compiled (``survey/_coverage_kernel.py``): connected components of the runs of zeros in each row,
    joined with union-find where runs of neighbouring rows overlap: two reads of the image plus work in
    the number of runs, no full-size label array. On a 3600-px simulated brick with a no-coverage
    border (6 % zeros) 0.010-0.018 s per band against 0.10-0.38 s for the former NumPy +
    ``scipy.ndimage.label`` version (bench/RESULTS.md, "read_brick"); ``tests/test_survey.py`` checks
    it against ``scipy.ndimage.label``.
    """
    from galaxalign_batch.survey._coverage_kernel import zero_regions_band

    a = _kernel_input(band_image)
    out = np.empty(a.shape, bool)
    zero_regions_band(a, int(min_pixels), out)
    return out


def _kernel_input(plane) -> np.ndarray:
    """A 2-D plane as the compiled pass reads it: native float32/float64 as is, anything else as float32."""
    a = np.asarray(plane)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D plane, got shape {a.shape}")
    if a.dtype.kind == "f" and a.dtype.itemsize in (4, 8) and a.dtype.isnative:
        return a
    return a.astype(np.float32)


def coverage_planes(path: str | os.PathLike, planes: list, bands: tuple[str, ...], invvar_planes: list | None = None,
                    *, out: np.ndarray | None = None, check: bool = True, consume: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The coverage rule on per-band planes, written into one (bands, H, W) float32 stack.

    Invalid: non-finite pixels; ``invvar <= 0`` or non-finite invvar; exact zeros in a 4-connected
    region of at least :data:`MIN_ZERO_REGION` pixels (counting invalid pixels, which read as 0).
    Invalid pixels are 0 in the image (and the invvar). One compiled pass per band
    (``survey/_coverage_kernel.py``) reads each plane once and writes the stack, so a reader need not
    stack its planes first; the zero-region labelling runs only on bands with valid exact zeros.
    ``out``: the image stack to write (it may hold the planes themselves: in place); default a new one.
    ``check``: the whole-image checks (TileError for a band entirely NaN/inf or no valid pixel at all;
    a warning for a band without coverage); off for a section of a brick.
    ``consume``: set each band's entries of ``planes`` and ``invvar_planes`` to None once the band is
    written, so that a reader which hands over its only references frees each plane as it goes (a
    3600-px brick's peak memory is then about the output arrays plus one band's planes, not all of them).
    Returns (image, valid, invvar or None).
    """
    from galaxalign_batch.survey._coverage_kernel import coverage_band

    shapes = [np.shape(p) for p in planes] + [np.shape(p) for p in invvar_planes or ()]
    if len(planes) != len(bands) or (invvar_planes is not None and len(invvar_planes) != len(bands)):
        raise ValueError(f"{len(bands)} bands, {len(planes)} image planes, "
                         f"{'no' if invvar_planes is None else len(invvar_planes)} invvar planes")
    if any(sh != shapes[0] for sh in shapes):
        raise ValueError(f"planes of different shapes: {shapes}")
    shape = (len(planes), *shapes[0])
    image = np.empty(shape, np.float32) if out is None else out
    valid = np.empty(shape, bool)
    has_iv = invvar_planes is not None
    invvar = np.empty(shape, np.float32) if has_iv else None
    dummy = np.zeros((1, 1), np.float32)
    n_valid = []
    for b, band in enumerate(bands):
        finite, nv, zeros = coverage_band(_kernel_input(planes[b]), _kernel_input(invvar_planes[b]) if has_iv else dummy,
                                          image[b], invvar[b] if has_iv else dummy, valid[b], has_iv)
        if consume:
            planes[b] = None
            if has_iv:
                invvar_planes[b] = None
        if check and finite == 0:
            raise TileError(path, f"band {band} is entirely NaN/inf")
        if zeros:  # zeros already invalid (invvar 0) need no labelling
            region = zero_regions(image[b])
            if region.any():
                valid[b] &= ~region
                if has_iv:
                    invvar[b][region] = 0.0
                nv = int(np.count_nonzero(valid[b]))
        n_valid.append(nv)
    if check:
        if not any(n_valid):
            raise TileError(path, "no valid pixels (empty tile: no coverage in any band)")
        for band, nv in zip(bands, n_valid):
            if not nv:
                log.warning("%s: band %s has no coverage (all pixels invalid)", path, band)
    return image, valid, invvar


def coverage(path: str | os.PathLike, image: np.ndarray, bands: tuple[str, ...],
             invvar: np.ndarray | None = None, copy: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply the coverage rule (:func:`coverage_planes`) to a (bands, H, W) image; returns (image float32
    with invalid = 0, valid, invvar or None). TileError for a zero-size image, a band that is entirely
    NaN/inf, or no valid pixel at all. ``copy=False`` may edit a float32 image in place.
    """
    image = np.asarray(image)
    if image.size == 0:
        raise TileError(path, f"empty image (zero size, shape {image.shape})")
    in_place = (not copy and image.dtype == np.float32 and image.dtype.isnative and image.flags.writeable
                and image.ndim == 3)
    return coverage_planes(path, list(image), bands, None if invvar is None else list(np.asarray(invvar)),
                           out=image if in_place else None)


def header_summary(header: fits.Header) -> dict:
    """The useful identification keys of a header as a plain dict (str/int/float values)."""
    out = {}
    for k in HEADER_KEYS:
        if k in header:
            v = header[k]
            out[k] = v.strip() if isinstance(v, str) else v
    if "BRICKNAM" in out and "BRICKNAME" not in out:
        out["BRICKNAME"] = out["BRICKNAM"]
    return out
