"""User catalogs for `join`: FITS tables, CSV and Parquet read into Arrow tables, RA/Dec columns found by name.

Positions are ICRS degrees. RA/Dec columns are recognised (case-insensitively) by the common
spellings in :data:`RA_NAMES` / :data:`DEC_NAMES`, or named with ``--ra-col`` / ``--dec-col``.
FITS columns with angle units (``rad``, ``arcsec``...) are converted to degrees; string columns
are parsed as sexagesimal (``10:00:28.6``, ``+02:12:21``: RA in hours) or decimal degrees.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from galaxalign_batch.downstream.common import CatalogError

log = logging.getLogger(__name__)

RA_NAMES = ("ra", "ra_deg", "radeg", "ra_icrs", "raj2000", "_raj2000", "ra_j2000", "ra2000", "ra_d", "alpha",
            "alpha_j2000", "right_ascension", "target_ra", "ra_obj")
DEC_NAMES = ("dec", "dec_deg", "decdeg", "dec_icrs", "de_icrs", "dej2000", "_dej2000", "decj2000", "dec_j2000",
             "dec2000", "dec_d", "de", "delta", "delta_j2000", "declination", "target_dec", "dec_obj")
FORMATS = {"fits": (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz"), "csv": (".csv", ".csv.gz", ".tsv", ".txt"),
           "parquet": (".parquet", ".pq")}


def catalog_format(path: str, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise CatalogError(f"catalog format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    low = path.lower()
    for name, suffixes in FORMATS.items():
        if low.endswith(suffixes):
            return name
    raise CatalogError(f"{path}: unknown catalog format (expected {', '.join(s for v in FORMATS.values() for s in v)}; "
                       "or give --format)")


def read_catalog(path: str | os.PathLike, fmt: str | None = None):
    """The catalog as a ``pyarrow.Table`` (FITS units kept in the fields' ``unit`` metadata)."""
    import pyarrow as pa

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CatalogError(f"{path}: catalog not found")
    fmt = catalog_format(path, fmt)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif fmt == "csv":
            import pyarrow.csv as pcsv

            delim = "\t" if path.lower().endswith(".tsv") else ","
            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delim))
        else:
            table = _read_fits(path)
    except CatalogError:
        raise
    except (OSError, ValueError, TypeError, KeyError, pa.ArrowException) as e:
        raise CatalogError(f"{path}: cannot read as a {fmt} table ({' '.join(str(e).split())[:200]})") from None
    if table.num_rows == 0:
        raise CatalogError(f"{path}: the catalog has no rows")
    return table


def _read_fits(path: str):
    import warnings

    import pyarrow as pa
    from astropy.io import fits
    from astropy.table import Table
    from astropy.units import UnitsWarning

    with fits.open(path, memmap=True) as hdus:
        ext = next((i for i, h in enumerate(hdus) if isinstance(h, (fits.BinTableHDU, fits.TableHDU))), None)
    if ext is None:
        raise CatalogError(f"{path}: no table HDU in the FITS file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        t = Table.read(path, hdu=ext)
    arrays, fields = [], []
    for name in t.colnames:
        col = t[name]
        data = np.asarray(col)
        if data.dtype.kind == "S":
            data = np.char.rstrip(np.char.decode(data, "ascii", "replace"))
        if data.dtype.byteorder not in ("=", "|"):
            data = data.astype(data.dtype.newbyteorder("="))
        mask = np.asarray(getattr(col, "mask", np.zeros(len(col), bool)))
        if data.ndim == 1:
            arr = pa.array(data, mask=mask if mask.any() and mask.ndim == 1 else None)
        else:
            flat = pa.array(np.ascontiguousarray(data).reshape(-1))
            arr = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(data.shape[1:])))
        meta = {"unit": str(col.unit)} if getattr(col, "unit", None) is not None else None
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata=meta))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def find_column(names: list[str], candidates: tuple[str, ...], given: str | None, what: str, path: str) -> str:
    if given:
        if given in names:
            return given
        low = {n.lower(): n for n in names}
        if given.lower() in low:
            return low[given.lower()]
        raise CatalogError(f"{path}: no column {given!r} for {what} (columns: {_listing(names)})")
    low = {n.lower(): n for n in names}
    for c in candidates:
        if c in low:
            return low[c]
    raise CatalogError(f"{path}: no recognisable {what} column (looked for {', '.join(candidates[:8])}, ...; "
                       f"columns: {_listing(names)}); name it with --{'ra' if what == 'RA' else 'dec'}-col")


def _listing(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


@dataclass
class Positions:
    ra: np.ndarray  # float64 degrees, NaN where invalid
    dec: np.ndarray
    valid: np.ndarray  # bool
    ra_col: str
    dec_col: str


def catalog_positions(table, path: str, ra_col: str | None = None, dec_col: str | None = None) -> Positions:
    """RA/Dec of every catalog row in degrees; rows without a usable position are marked invalid."""
    names = table.column_names
    ra_name = find_column(names, RA_NAMES, ra_col, "RA", path)
    dec_name = find_column(names, DEC_NAMES, dec_col, "Dec", path)
    ra = _angle_column(table, ra_name, path, hours_if_text=True)
    dec = _angle_column(table, dec_name, path, hours_if_text=False)
    valid = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)
    if not valid.any():
        raise CatalogError(f"{path}: columns {ra_name}/{dec_name} hold no valid position (ICRS degrees expected; "
                           f"Dec must lie in [-90, 90])")
    if not valid.all():
        log.warning("%s: %d of %d rows have no valid RA/Dec; they stay unmatched", path, int((~valid).sum()), len(valid))
    ra = np.where(valid, np.mod(ra, 360.0), np.nan)
    dec = np.where(valid, dec, np.nan)
    return Positions(ra, dec, valid, ra_name, dec_name)


def _angle_column(table, name: str, path: str, hours_if_text: bool) -> np.ndarray:
    import astropy.units as u
    import pyarrow as pa

    col = table.column(name)
    field = table.schema.field(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return _parse_text_angles(col.to_pylist(), name, path, hours_if_text)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_decimal(col.type)):
        raise CatalogError(f"{path}: column {name} is of type {col.type}, not numbers of degrees")
    values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    unit = (field.metadata or {}).get(b"unit")
    if unit:
        try:
            q = u.Unit(unit.decode())
            if q.physical_type == "angle" and q != u.deg:
                values = (values * q).to_value(u.deg)
        except ValueError:
            pass
    return values


def _parse_text_angles(values: list, name: str, path: str, hours_if_text: bool) -> np.ndarray:
    from astropy.coordinates import Angle
    import astropy.units as u

    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v is None or not str(v).strip():
            continue
        s = str(v).strip()
        try:
            sexagesimal = any(ch in s for ch in ": hdms")
            unit = (u.hourangle if hours_if_text else u.deg) if sexagesimal else u.deg
            out[i] = Angle(s, unit=unit).to_value(u.deg)
        except (ValueError, u.UnitsError):
            raise CatalogError(f"{path}: column {name}, row {i}: cannot read {s!r} as an angle") from None
    return out
