"""The Legacy Survey brick grid and the DR9/DR10 file layout (pure Python, numpy, astropy).

Bricks follow the DR9 ``survey-bricks.fits`` definition: 721 rows of 0.25 deg in Dec, centred on
Dec = -90, -89.75, ..., +90; row ``i`` has an even number of columns ``ceil(1440 cos(|dec_i| - 0.125) / 2) * 2``
(one brick at each pole), equal slices of RA from 0. A brick's *unique area* is its cell
``ra1 <= ra < ra2, dec1 <= dec < dec2``; its image is 3600 x 3600 px at 0.262"/px (0.262 deg), a
little larger than the cell, so neighbouring bricks overlap. The name is ``RRRr[pm]DDd`` from the
brick *centre* (RA*10 and |Dec|*10, truncated). This reproduces the 662,174 DR9 bricks.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import ConfigError

PIXSCALE = 0.262  # arcsec / pixel
BRICK_SIZE = 3600  # pixels on a side
BANDS = ("g", "r", "z")
ROW_HEIGHT = 0.25  # deg
IMAGE_KINDS = ("image", "invvar")

_NAME_RE = re.compile(r"^(\d{4})([pm])(\d{3})$")


@dataclass(frozen=True)
class BrickInfo:
    """One row of ``survey-bricks.fits`` (degrees; ``brickid`` 1-based, row/col 0-based)."""

    brickname: str
    brickid: int
    brickrow: int
    brickcol: int
    ra: float
    dec: float
    ra1: float
    ra2: float
    dec1: float
    dec2: float

    def contains(self, ra, dec):
        """True where (ra, dec) lies in the brick's unique area (the ``brick_primary`` test)."""
        ra = np.mod(np.asarray(ra, dtype=np.float64), 360.0)
        dec = np.asarray(dec, dtype=np.float64)
        inside = (ra >= self.ra1) & (ra < self.ra2) & (dec >= self.dec1) & (dec < self.dec2)
        if self.dec2 >= 90.0:  # the north polar cap includes the pole itself
            inside = inside | ((dec >= self.dec1) & (dec >= 90.0))
        return inside


@lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row centre Dec, columns per row, first brickid of each row)."""
    centres = np.arange(-90.0, 90.0 + ROW_HEIGHT / 2, ROW_HEIGHT)
    declo = np.abs(centres) - ROW_HEIGHT / 2
    ncols = (np.ceil(360.0 / ROW_HEIGHT * np.cos(np.radians(declo)) / 2) * 2).astype(np.int64)
    ncols[0] = ncols[-1] = 1
    first_id = np.concatenate([[0], np.cumsum(ncols)[:-1]]) + 1
    return centres, ncols, first_id


def _row_col(ra, dec) -> tuple[np.ndarray, np.ndarray]:
    ra = np.mod(np.asarray(ra, dtype=np.float64), 360.0)
    dec = np.asarray(dec, dtype=np.float64)
    if np.any(~np.isfinite(ra)) or np.any(~np.isfinite(dec)) or np.any(np.abs(dec) > 90.0):
        raise ConfigError("ra/dec must be finite with -90 <= dec <= 90")
    centres, ncols, _ = _grid()
    row = np.clip(((dec + 90.0 + ROW_HEIGHT / 2) / ROW_HEIGHT).astype(np.int64), 0, len(centres) - 1)
    col = np.minimum((ra / 360.0 * ncols[row]).astype(np.int64), ncols[row] - 1)
    return row, col


def _name(ra_centre: float, dec_centre: float) -> str:
    ra_digits = f"{ra_centre * 10000:07.0f}"[:4]
    dec_digits = f"{abs(dec_centre) * 10000:06.0f}"[:3]
    return f"{ra_digits}{'p' if dec_centre >= 0 else 'm'}{dec_digits}"


def _info(row: int, col: int) -> BrickInfo:
    centres, ncols, first_id = _grid()
    n = int(ncols[row])
    edges = np.linspace(0.0, 360.0, n + 1)
    ra1, ra2 = float(edges[col]), float(edges[col + 1])
    ra = 0.5 * (ra1 + ra2) if n > 1 else 180.0
    dec = float(centres[row])
    dec1 = max(dec - ROW_HEIGHT / 2, -90.0)
    dec2 = min(dec + ROW_HEIGHT / 2, 90.0)
    return BrickInfo(_name(ra, dec), int(first_id[row] + col), int(row), int(col), ra, dec, ra1, ra2, dec1, dec2)


def brick_at(ra: float, dec: float) -> BrickInfo:
    """The brick whose unique area holds (ra, dec) [deg]."""
    row, col = _row_col(ra, dec)
    return _info(int(row), int(col))


def brick_name(ra, dec):
    """Name of the brick holding (ra, dec): a ``str`` for scalars, an array of ``str`` for arrays."""
    if np.ndim(ra) == 0 and np.ndim(dec) == 0:
        return brick_at(float(ra), float(dec)).brickname
    rows, cols = np.broadcast_arrays(*_row_col(ra, dec))
    names: dict[tuple[int, int], str] = {}
    for r, c in set(zip(rows.ravel().tolist(), cols.ravel().tolist())):
        names[(r, c)] = _info(r, c).brickname
    out = [names[(r, c)] for r, c in zip(rows.ravel().tolist(), cols.ravel().tolist())]
    return np.array(out, dtype="U8").reshape(rows.shape)


def brick_by_name(name: str) -> BrickInfo:
    """The brick called ``name`` (e.g. ``1498p025``); ConfigError if no brick has that name."""
    m = _NAME_RE.match(str(name))
    if not m:
        raise ConfigError(f"not a Legacy Survey brick name: {name!r} (expected RRRr[pm]DDd, e.g. 1498p025)")
    ra_lo = int(m[1]) / 10.0
    dec_abs = math.ceil(int(m[3]) / 10.0 / ROW_HEIGHT - 1e-9) * ROW_HEIGHT
    dec = dec_abs if m[2] == "p" else -dec_abs
    if abs(dec) <= 90.0 and ra_lo < 360.0:
        info = brick_at(ra_lo + 0.05, dec)
        if info.brickname == name:
            return info
    raise ConfigError(f"no Legacy Survey brick is named {name!r}")


def _cells(lo: float, hi: float, n: int) -> range:
    """Indices of the cells of [0, n) (unit width) met by [lo, hi]; an upper edge touching a cell is not enough."""
    c0 = int(math.floor(lo))
    c1 = int(math.floor(hi)) if hi == lo else int(math.ceil(hi)) - 1
    return range(max(c0, 0), min(max(c1, c0), n - 1) + 1)


def bricks_in(ra_min: float, ra_max: float, dec_min: float, dec_max: float) -> list[BrickInfo]:
    """Bricks whose unique area meets the box (degrees); ``ra_min > ra_max`` means it wraps through RA 0."""
    if not dec_min <= dec_max:
        raise ConfigError(f"dec_min {dec_min} > dec_max {dec_max}")
    if not (-90.0 <= dec_min and dec_max <= 90.0):
        raise ConfigError(f"dec range [{dec_min}, {dec_max}] is outside [-90, 90]")
    centres, ncols, _ = _grid()
    rows = _cells((dec_min + 90.0 + ROW_HEIGHT / 2) / ROW_HEIGHT, (dec_max + 90.0 + ROW_HEIGHT / 2) / ROW_HEIGHT,
                  len(centres))
    full = ra_max - ra_min >= 360.0
    ra_min, ra_max = ra_min % 360.0, (ra_max % 360.0 if ra_max % 360.0 or ra_max == 0 else 360.0)
    spans = [(0.0, 360.0)] if full else [(ra_min, ra_max)] if ra_min <= ra_max else [(ra_min, 360.0), (0.0, ra_max)]
    out: list[BrickInfo] = []
    for row in rows:
        n = int(ncols[row])
        cols = sorted({c for lo, hi in spans for c in _cells(lo / 360.0 * n, hi / 360.0 * n, n)})
        out.extend(_info(row, c) for c in cols)
    return out


def brick_wcs(brick: BrickInfo, width: int = BRICK_SIZE, height: int | None = None, pixscale: float = PIXSCALE):
    """The legacypipe TAN WCS of a brick image: centred on the brick, CRPIX = size/2 + 0.5, RA to the left."""
    from astropy.wcs import WCS

    height = width if height is None else height
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [brick.ra, brick.dec]
    w.wcs.crpix = [width / 2.0 + 0.5, height / 2.0 + 0.5]
    w.wcs.cd = np.array([[-pixscale / 3600.0, 0.0], [0.0, pixscale / 3600.0]])
    w.wcs.equinox = 2000.0
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (width, height)
    return w


# --- file layout ---------------------------------------------------------------------------------

def _check_band(band: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9]+", band or ""):
        raise ConfigError(f"bad band name {band!r}")


def coadd_dir(root: str | os.PathLike, brick: str) -> Path:
    return Path(root) / "coadd" / brick[:3] / brick


def image_path(root: str | os.PathLike, brick: str, band: str, kind: str = "image") -> Path:
    """``root/coadd/<AAA>/<brick>/legacysurvey-<brick>-<kind>-<band>.fits.fz`` (kind: image | invvar)."""
    if kind not in IMAGE_KINDS:
        raise ConfigError(f"image kind must be one of {IMAGE_KINDS}, not {kind!r}")
    _check_band(band)
    return coadd_dir(root, brick) / f"legacysurvey-{brick}-{kind}-{band}.fits.fz"


def maskbits_path(root: str | os.PathLike, brick: str) -> Path:
    return coadd_dir(root, brick) / f"legacysurvey-{brick}-maskbits.fits.fz"


def tractor_path(root: str | os.PathLike, brick: str) -> Path:
    return Path(root) / "tractor" / brick[:3] / f"tractor-{brick}.fits"


def survey_bricks_path(root: str | os.PathLike) -> Path:
    return Path(root) / "survey-bricks.fits"


def list_bricks(root: str | os.PathLike) -> list[str]:
    """Sorted names of the bricks with at least one ``legacysurvey-<brick>-image-<band>`` file under
    ``root/coadd`` (a folder holding only other products, e.g. model or chi2 images, is no brick to embed)."""
    coadd = Path(root) / "coadd"
    if not coadd.is_dir():
        return []
    names = []
    for d in sorted(coadd.glob("[0-9][0-9][0-9]/*")):
        if d.is_dir() and _NAME_RE.match(d.name) and d.name[:3] == d.parent.name \
                and any(d.glob(f"legacysurvey-{d.name}-image-*.fits*")):
            names.append(d.name)
    return names


def is_survey_root(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory laid out like a Legacy Survey release (``coadd/`` with bricks)."""
    return Path(path).is_dir() and bool(list_bricks(path))


#: ``legacysurvey-<brick>-<kind>-<band>.fits[.fz]`` and ``legacysurvey-<brick>-maskbits.fits[.fz]``
BRICK_FILE_RE = re.compile(r"^legacysurvey-(?P<brick>\d{4}[pm]\d{3})-(?:(?P<kind>image|invvar)-(?P<band>[A-Za-z0-9]+)"
                           r"|(?P<maskbits>maskbits))\.fits(?:\.fz)?$")


def parse_brick_filename(path: str | os.PathLike) -> dict | None:
    """``{"brick", "kind", "band"}`` for a Legacy Survey coadd file name (kind ``maskbits`` has band None)."""
    m = BRICK_FILE_RE.match(Path(path).name)
    if not m:
        return None
    if m["maskbits"]:
        return {"brick": m["brick"], "kind": "maskbits", "band": None}
    return {"brick": m["brick"], "kind": m["kind"], "band": m["band"]}
