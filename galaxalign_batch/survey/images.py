"""RGB image sets as tiles: a folder, glob or CSV of PNG/JPEG pictures (Galaxy Zoo, Galaxy10, viewer JPEGs).

Each picture is one tile of one source (its key: the resolved path, as for a cube), so a set embeds
and resumes through the engine's store and exactly-once machinery, and a corrupt picture is a failed
tile with its one-line reason while the rest completes.

- ``object_id``: the file name without its suffix, or a CSV's id column;
- ``ra``, ``dec``: a CSV's columns when it has them, else NaN (``healpix`` -1);
- the scale: ``pixscale`` (arcsec/px of the files, or a CSV's ``pixscale``/``pxscale`` column per
  picture) or ``angular_size`` (arcsec the picture's width spans); without either the picture is taken
  to show the model's field (resized whole to the model input). See docs/engine.md.

Files named like Legacy Survey products (``legacysurvey-<brick>-image.jpg`` beside the FITS of a
coadd folder) are never pictures of a set.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import ConfigError, TileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CSV_SUFFIXES = (".csv",)
_SURVEY_PRODUCT = re.compile(r"^legacysurvey-\d{4}[pm]\d{3}-", re.IGNORECASE)

FILE_COLUMNS = ("file", "filepath", "file_path", "filename", "path", "image", "image_path", "png", "jpg",
                "local_png_loc", "png_loc")
ID_COLUMNS = ("object_id", "id", "objid", "iauname", "name", "dr8_id", "galaxy_id", "id_str")
RA_COLUMNS = ("ra", "ra_deg", "raj2000", "ra_j2000", "_raj2000")
DEC_COLUMNS = ("dec", "dec_deg", "dej2000", "decj2000", "dec_j2000", "_dej2000")
PIXSCALE_COLUMNS = ("pixscale", "pxscale", "pixel_scale")


@dataclass(frozen=True, order=True)
class ImageRef:
    """One picture of a set: ``name`` is its store key (the resolved path)."""

    name: str
    path: str
    object_id: str
    ra: float = math.nan
    dec: float = math.nan
    pixscale: float = math.nan  # arcsec/px from a CSV column; NaN: the run's --pixscale / --angular-size

    brick = None
    kind = "image"

    @property
    def is_brick(self) -> bool:
        return False


def is_picture(path: str | os.PathLike) -> bool:
    """A PNG/JPEG file that is not a Legacy Survey product (e.g. a coadd folder's ``-image.jpg``)."""
    name = os.path.basename(os.fspath(path))
    return name.lower().endswith(IMAGE_SUFFIXES) and not _SURVEY_PRODUCT.match(name)


def is_csv(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(CSV_SUFFIXES)


def files_under(folder: str | os.PathLike) -> list[str]:
    """Every file under ``folder``, in one walk: sorted, recursive, following links to folders (each real
    folder once, so a link cycle ends), skipping hidden names (``.``-prefixed: macOS ``._x.png``
    resource forks, ``.git``), as a shell glob does."""
    out: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def picture_ref(path: str | os.PathLike) -> ImageRef:
    real = os.path.realpath(os.fspath(path))
    stem = os.path.basename(real)
    for suffix in IMAGE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return ImageRef(real, real, stem)


def _column(header: list[str], given: str | None, candidates: tuple[str, ...], what: str, where) -> int | None:
    low = [h.strip().lower() for h in header]
    if given:
        if given.strip().lower() not in low:
            raise ConfigError(f"{where}: no {what} column {given!r} (columns: {', '.join(header)})")
        return low.index(given.strip().lower())
    return next((low.index(c) for c in candidates if c in low), None)


def _number(text: str, what: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {what} {text!r} is not a number (degrees, or arcsec/px for the scale)") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {what} {text!r} is not finite")
    return v


def read_image_csv(path: str | os.PathLike, *, id_col: str | None = None, ra_col: str | None = None,
                   dec_col: str | None = None, file_col: str | None = None) -> list[ImageRef]:
    """The pictures a CSV lists: a file column (``file``, ``filepath``, ``path``, ``image``, ...; relative
    paths from the CSV's folder), optional id, ra/dec (degrees) and per-picture pixscale columns."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ConfigError(f"{path}: empty CSV (expected a header with a file column)")
    header = rows[0]
    fi = _column(header, file_col, FILE_COLUMNS, "file", path)
    if fi is None:
        raise ConfigError(f"{path}: no column naming the picture files (one of {', '.join(FILE_COLUMNS)}); "
                          f"columns: {', '.join(header)}")
    ii = _column(header, id_col, ID_COLUMNS, "id", path)
    ri = _column(header, ra_col, RA_COLUMNS, "ra", path)
    di = _column(header, dec_col, DEC_COLUMNS, "dec", path)
    if (ri is None) != (di is None):
        raise ConfigError(f"{path}: an ra column without a dec column or the reverse (columns: {', '.join(header)})")
    si = _column(header, None, PIXSCALE_COLUMNS, "pixscale", path)
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        where = f"{path} line {n}"
        if len(row) < len(header):
            raise ConfigError(f"{where}: {len(row)} fields, the header has {len(header)}")
        p = Path(row[fi].strip())
        p = p if p.is_absolute() else path.parent / p
        ref = picture_ref(p)
        oid = row[ii].strip() if ii is not None else ref.object_id
        if not oid:
            raise ConfigError(f"{where}: empty id")
        ra = _number(row[ri], "ra", where) if ri is not None else math.nan
        dec = _number(row[di], "dec", where) if di is not None else math.nan
        if ri is not None and not -90.0 <= dec <= 90.0:
            raise ConfigError(f"{where}: dec {dec} is outside [-90, 90]")
        scale = _number(row[si], "pixscale", where) if si is not None else math.nan
        if si is not None and scale <= 0:
            raise ConfigError(f"{where}: pixscale {scale} must be > 0 arcsec/px")
        out.append(ImageRef(ref.name, ref.path, oid, ra % 360.0 if ri is not None else ra, dec, scale))
    if not out:
        raise ConfigError(f"{path}: no rows")
    return out


def check_unique_ids(refs: list[ImageRef]) -> None:
    """Object ids must be unique in a store: two pictures with one id (``a/x.png`` and ``b/x.png``) are refused."""
    seen: dict[str, str] = {}
    for r in refs:
        other = seen.setdefault(r.object_id, r.name)
        if other != r.name:
            raise ConfigError(f"two pictures would get the object id {r.object_id!r}: {other} and {r.name} "
                              "(ids are file names without their suffix); list them in a CSV with an id column")


def read_picture(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a PNG/JPEG; :class:`TileError` (one line) for a missing or corrupt file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TileError(path, "file does not exist")
    if os.path.getsize(path) == 0:
        raise TileError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not later
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise TileError(path, f"cannot read image ({' '.join(str(e).split())})") from None
    if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise TileError(path, f"image of shape {arr.shape} is too small")
    return arr
