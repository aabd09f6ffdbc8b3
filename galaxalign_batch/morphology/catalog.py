"""Measuring many sources: the rows of a store (or the sources of tiles), in parallel, into one table.

Sources are grouped by tile; each worker process opens a tile once (the last one is kept) and
measures chunks of its sources with :func:`galaxalign_batch.morphology.measure.measure_source`. A
source that fails gets flag 4 and its reason in ``error``; a tile that cannot be read gives that
for all of its sources. The table is keyed by ``object_id`` (joins with ``galaxalign-batch join
--on object_id``) and written atomically (temporary name, then rename): Parquet, FITS or CSV by the
suffix of ``out``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from astropy.table import Table

from galaxalign_batch import atomic, progress
from galaxalign_batch.errors import ConfigError, GalaxAlignError
from galaxalign_batch.morphology.measure import (DEFAULT_PSF_FWHM_ARCSEC, MEASURED_COLUMNS, MorphologyConfig,
                                                 band_noise, empty_row, measure_source, moffat_psf)

log = logging.getLogger(__name__)

TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".fits": "fits", ".fit": "fits", ".csv": "ascii.ecsv",
                 ".ecsv": "ascii.ecsv"}
CHUNK = 8


@dataclass
class Job:
    """The sources of one tile to measure: how to open it, and per source id / position."""

    tile: str          # the store's tile value (brick name or cube path)
    path: str          # open_tile arguments
    brick: str | None
    object_id: list
    x: np.ndarray
    y: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    psf_fwhm: float | None = None
    error: str = ""    # the tile cannot be located


@dataclass
class MorphologySummary:
    out: str
    rows: int
    measured: int
    flags: dict
    failed: int
    seconds: float
    per_source_seconds: float
    workers: int
    errors: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        flags = ", ".join(f"flag {k}: {v}" for k, v in sorted(self.flags.items()))
        out = [f"{self.out}: {self.rows} sources in {self.seconds:.1f} s ({self.workers} worker(s), "
               f"{self.per_source_seconds:.2f} s per source in a worker); {flags}"]
        if self.failed:
            top = sorted(self.errors.items(), key=lambda kv: -kv[1])[:3]
            out.append(f"{self.failed} not measured: " + "; ".join(f"{n} x {e}" for e, n in top))
        return out


def table_format(out: str) -> str:
    suffix = os.path.splitext(str(out))[1].lower()
    if suffix not in TABLE_FORMATS:
        raise ConfigError(f"{out}: unknown table format (use one of {', '.join(sorted(TABLE_FORMATS))})")
    return TABLE_FORMATS[suffix]


def write_table(table: Table, out: str | os.PathLike) -> None:
    """Write ``table`` to ``out`` (format by suffix) through a temporary file and a rename."""
    fmt = table_format(os.fspath(out))
    with atomic.replacing(out) as tmp:
        table.write(tmp, format=fmt, overwrite=True)


def read_table(path: str | os.PathLike) -> Table:
    """A morphology table written by :func:`write_table` (object ids as str)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such morphology table")
    t = Table.read(path, format=table_format(path))
    if "object_id" not in t.colnames:
        raise ConfigError(f"{path}: not a morphology table (no object_id column)")
    for c in t.colnames:  # CSV/ECSV read empty strings back as masked
        if t[c].dtype.kind in "US" and hasattr(t[c], "filled"):
            t[c] = t[c].filled("")
    t["object_id"] = np.asarray(t["object_id"]).astype(str)
    return t


def tractor_psf_fwhm(tile, band: str) -> float | None:
    """Median ``psfsize_<band>`` of the Tractor catalog of a brick read from a survey tree, else None."""
    import fitsio

    from galaxalign_batch.survey import layout
    from galaxalign_batch.survey.bricks import survey_root_of

    if getattr(tile, "kind", None) != "brick":
        return None
    root = survey_root_of(tile)
    if root is None:
        return None
    path = layout.tractor_path(root, tile.name)
    if not path.exists():
        return None
    try:
        with fitsio.FITS(str(path)) as f:
            names = [c.lower() for c in f[1].get_colnames()]
            col = f"psfsize_{band}"
            if col not in names:
                return None
            v = np.asarray(f[1].read_column(f[1].get_colnames()[names.index(col)]), np.float64)
    except OSError:
        return None
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if len(v) else None


_TILE_CACHE: dict = {}


def _open(path: str, brick: str | None):
    from galaxalign_batch.survey import open_tile

    key = (path, brick)
    if key not in _TILE_CACHE:
        _TILE_CACHE.clear()
        tile = open_tile(path, brick)
        _TILE_CACHE[key] = tile
    return _TILE_CACHE[key]


def _resolve_psf(tile, band: str, psf_fwhm) -> float | None:
    if psf_fwhm is None:
        return None
    if isinstance(psf_fwhm, str):  # "auto"
        v = tractor_psf_fwhm(tile, band)
        return v if v is not None else DEFAULT_PSF_FWHM_ARCSEC
    return float(psf_fwhm)


def measure_chunk(job: Job, start: int, stop: int, cfg_dict: dict, psf_fwhm) -> list[dict]:
    """Measure sources ``start:stop`` of ``job`` (runs in a worker process)."""
    cfg = MorphologyConfig(**cfg_dict)
    n = stop - start
    if job.error:
        return [dict(empty_row(job.error), psf_fwhm=np.nan, seconds=0.0) for _ in range(n)]
    try:
        tile = _open(job.path, job.brick)
        b = tile.band_index(cfg.band)
    except (GalaxAlignError, KeyError, ValueError) as e:
        reason = " ".join(str(e).split())
        return [dict(empty_row(reason), psf_fwhm=np.nan, seconds=0.0) for _ in range(n)]
    fwhm = job.psf_fwhm if job.psf_fwhm is not None else _resolve_psf(tile, cfg.band, psf_fwhm)
    psf = moffat_psf(fwhm, tile.pixscale) if fwhm else None
    key = ("noise", job.path, job.brick, b)
    if key not in _TILE_CACHE:
        _TILE_CACHE[key] = band_noise(tile, b)
    noise = _TILE_CACHE[key]
    image = tile.image[b].astype(np.float64, copy=False)
    valid = tile.valid[b]
    rows = []
    for i in range(start, stop):
        try:
            row = measure_source(image, noise, valid, float(job.x[i]), float(job.y[i]), tile.pixscale, cfg, psf)
        except Exception as e:  # never lose a whole chunk to one odd source
            row = dict(empty_row(f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"), seconds=0.0)
        row["psf_fwhm"] = float(fwhm) if fwhm else np.nan
        rows.append(row)
    return rows


def _strings(values) -> np.ndarray:
    """A store string column (numpy StringDType) as a fixed-width str array."""
    return np.asarray(values).astype(object).astype(str)


def jobs_from_store(store, roots: Sequence[str] | None = None, limit: int | None = None,
                    rows: np.ndarray | None = None) -> list[Job]:
    """One :class:`Job` per tile of the store's committed rows (the first ``limit``, or ``rows``)."""
    n = store.n_rows
    sel = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    if limit is not None:
        sel = sel[: max(int(limit), 0)]
    if not len(sel):
        raise ConfigError(f"{store.path}: no rows to measure")
    opener = store.tile_opener(roots)
    ids = _strings(store.read("object_id", sel))
    tiles = _strings(store.read("tile", sel))
    x, y = store.read("x", sel).astype(np.float64), store.read("y", sel).astype(np.float64)
    ra, dec = store.read("ra", sel).astype(np.float64), store.read("dec", sel).astype(np.float64)
    jobs = []
    for name in dict.fromkeys(tiles):
        k = np.flatnonzero(tiles == name)
        try:
            path, brick, error = *opener.locate(name), ""
        except GalaxAlignError as e:
            path, brick, error = name, None, " ".join(str(e).split())
        jobs.append(Job(name, path, brick, list(ids[k]), x[k], y[k], ra[k], dec[k], error=error))
    return jobs


def jobs_from_tiles(paths: Sequence[str], bricks=None, catalog: str = "auto", limit: int | None = None) -> list[Job]:
    """One :class:`Job` per tile of ``--tiles`` paths, sources from :func:`galaxalign_batch.survey.sources_for`."""
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.survey import open_tile, sources_for

    jobs, left = [], limit
    for ref in resolve_tiles(list(paths), bricks):
        if left is not None and left <= 0:
            break
        try:
            tile = open_tile(ref.path, ref.brick)
            # detected sources named "{tile key}/det{i}" as embed names them, so the catalogue joins the store
            src = sources_for(tile, catalog if catalog != "detect" else None, id_prefix=ref.name)
        except GalaxAlignError as e:
            log.warning("skipping tile %s: %s", ref.name, e)
            continue
        if left is not None:
            src = src[:left]
            left -= len(src)
        jobs.append(Job(ref.name, ref.path, ref.brick, list(np.asarray(src["object_id"]).astype(str)),
                        np.asarray(src["x"], np.float64), np.asarray(src["y"], np.float64),
                        np.asarray(src["ra"], np.float64), np.asarray(src["dec"], np.float64)))
    if not jobs:
        raise ConfigError("no sources to measure in the given tiles")
    return jobs


def measure_jobs(jobs: list[Job], *, cfg: MorphologyConfig = MorphologyConfig(), psf_fwhm="auto",
                 workers: int = 1, chunk: int = CHUNK) -> Table:
    """Measure every source of ``jobs`` (``workers`` processes) and return the table, in job order.

    ``psf_fwhm``: ``"auto"`` (the tile's Tractor ``psfsize`` median, else 1.3"), a number (arcsec),
    or None (Sersic fits without PSF).
    """
    if isinstance(psf_fwhm, str) and psf_fwhm != "auto":
        raise ConfigError(f"psf_fwhm must be 'auto', a number of arcsec or None, got {psf_fwhm!r}")
    tasks = [(j, s, min(s + chunk, len(j.object_id))) for j in jobs for s in range(0, len(j.object_id), chunk)]
    total = sum(len(j.object_id) for j in jobs)
    results: dict[tuple[int, int], list[dict]] = {}
    cfg_dict = cfg.as_dict()
    bar = progress.bar(total=total, desc="morphology", unit="src")
    if workers <= 1:
        for j, s, e in tasks:
            results[(id(j), s)] = measure_chunk(j, s, e, cfg_dict, psf_fwhm)
            bar.update(e - s)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(measure_chunk, j, s, e, cfg_dict, psf_fwhm): (id(j), s, e - s) for j, s, e in tasks}
            for f in as_completed(futures):
                jid, s, n = futures[f]
                results[(jid, s)] = f.result()
                bar.update(n)
    bar.close()
    _TILE_CACHE.clear()
    out_rows, meta = [], []
    for j in jobs:
        for s in range(0, len(j.object_id), chunk):
            out_rows.extend(results[(id(j), s)])
        meta.extend((oid, j.tile, float(ra), float(dec), float(x), float(y))
                    for oid, ra, dec, x, y in zip(j.object_id, j.ra, j.dec, j.x, j.y))
    return _as_table(meta, out_rows, cfg)


def _as_table(meta: list[tuple], rows: list[dict], cfg: MorphologyConfig) -> Table:
    t = Table()
    t["object_id"] = np.array([m[0] for m in meta], dtype=str)
    t["tile"] = np.array([m[1] for m in meta], dtype=str)
    for k, name in enumerate(("ra", "dec", "x", "y"), start=2):
        t[name] = np.array([m[k] for m in meta], np.float64)
    for c in MEASURED_COLUMNS:
        t[c] = np.array([r.get(c, np.nan) for r in rows], np.float64)
    t["flag"] = np.array([r["flag"] for r in rows], np.int16)
    t["flag_sersic"] = np.array([r["flag_sersic"] for r in rows], np.int16)
    t["psf_fwhm"] = np.array([r.get("psf_fwhm", np.nan) for r in rows], np.float32)
    t["stamp_px"] = np.array([r.get("stamp_px", 0) for r in rows], np.int32)
    t["seconds"] = np.array([r.get("seconds", 0.0) for r in rows], np.float32)
    t["error"] = np.array([r.get("error", "") for r in rows], dtype=str) if rows else np.zeros(0, str)
    for c in ("rpetro_circ", "rhalf_circ", "rhalf_ellip", "sersic_rhalf", "sersic_rhalf_circ", "psf_fwhm"):
        t[c].unit = "arcsec"
    t.meta["morphology"] = {"config": cfg.as_dict(), "software": "statmorph",
                            "statmorph_version": _version("statmorph"), "photutils_version": _version("photutils")}
    return t


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"


def summarize(table: Table, out: str, seconds: float, workers: int) -> MorphologySummary:
    flags = {int(k): int(v) for k, v in zip(*np.unique(np.asarray(table["flag"]), return_counts=True))}
    err = np.asarray(table["error"]).astype(str)
    failed = err != ""
    errors: dict = {}
    for e in err[failed]:
        errors[e] = errors.get(e, 0) + 1
    sec = np.asarray(table["seconds"], np.float64)
    return MorphologySummary(out, len(table), int((~failed).sum()), flags, int(failed.sum()), seconds,
                             float(sec[~failed].mean()) if (~failed).any() else float("nan"), workers, errors)


def measure_store(store_path, out, *, roots=None, limit: int | None = None, workers: int = 1,
                  cfg: MorphologyConfig = MorphologyConfig(), psf_fwhm="auto") -> MorphologySummary:
    """Measure the store's rows (the first ``limit``) and write the table to ``out``."""
    from galaxalign_batch.store import open_readable

    table_format(out)  # refuse a bad suffix before the work
    t0 = time.perf_counter()
    store = open_readable(store_path)
    table = measure_jobs(jobs_from_store(store, roots, limit), cfg=cfg, psf_fwhm=psf_fwhm, workers=workers)
    table.meta["morphology"]["store"] = os.path.abspath(os.fspath(store_path))
    write_table(table, out)
    return summarize(table, os.fspath(out), time.perf_counter() - t0, workers)


def measure_tiles(paths: Sequence[str], out, *, bricks=None, catalog: str = "auto", limit: int | None = None,
                  workers: int = 1, cfg: MorphologyConfig = MorphologyConfig(), psf_fwhm="auto") -> MorphologySummary:
    """Measure the sources of tiles (Tractor catalog or detection, as ``embed``) and write the table."""
    table_format(out)
    t0 = time.perf_counter()
    table = measure_jobs(jobs_from_tiles(paths, bricks, catalog, limit), cfg=cfg, psf_fwhm=psf_fwhm, workers=workers)
    write_table(table, out)
    return summarize(table, os.fspath(out), time.perf_counter() - t0, workers)
