"""`join`: a user catalog cross-matched with the store by position (or joined on object ids).

Positional match, for every catalog row the nearest stored source within the radius (ties: lower
store row), exact on the sphere:

1. A coarse HEALPix order is chosen whose pixels are >= 30 times the radius. Catalog rows are
   sorted by their pixel at that order; the store's ``healpix`` column (order 29, nested) gives
   each stored row's coarse pixel by a shift.
2. The store is processed in row ranges (dask tasks on a thread pool; each reads its own
   ``healpix``/``ra``/``dec`` slices, so memory is bounded by the range, not the store). A range's
   candidate catalog rows are those in the range's pixels or their 8 neighbours: a source within
   the radius of a catalog row lies in the row's pixel or a neighbour.
3. A KD-tree (scipy ``cKDTree``) on the range's unit vectors answers nearest-neighbour queries of
   the candidates with ``distance_upper_bound`` = the chord of the radius: chord distance is
   monotonic in angle and unit vectors have no RA wrap or pole singularity.
4. Per catalog row the best over ranges is kept.

The catalog's positions and columns are held in memory (the store is streamed). Output: a
Parquet file with every catalog column plus ``store_row``, ``object_id``, ``store_ra``,
``store_dec``, ``separation_arcsec`` and, when the store is classified, ``label``, ``confidence``,
``probs`` (list of K floats; class keys in the file metadata); ``embedding`` with
``--with-embedding``. Written to a temporary file and renamed: never half-written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from galaxalign_batch import atomic, progress
from galaxalign_batch._version import __version__
from galaxalign_batch.downstream.catalogs import catalog_positions, read_catalog
from galaxalign_batch.downstream.common import CatalogError, classification_of
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.sky import arcsec_from_chord, chord_from_arcsec, radec_to_xyz
from galaxalign_batch.store import EmbeddingStore, open_readable, open_store, schema

log = logging.getLogger(__name__)

MAX_RADIUS_ARCSEC = 3600.0
PIXEL_MARGIN = 30.0  # coarse pixels are at least this many radii across
MAX_PARTITION_ORDER = 10
TASK_ROWS = 262_144


@dataclass
class JoinSummary:
    out: str
    catalog_rows: int
    matched: int
    how: str
    seconds: float
    columns: list[str]

    def lines(self) -> list[str]:
        pct = 100.0 * self.matched / max(self.catalog_rows, 1)
        return [f"{self.out}: {self.catalog_rows} catalog rows, {self.matched} matched ({pct:.1f}%) {self.how} "
                f"in {self.seconds:.1f} s",
                f"columns added: {', '.join(self.columns)}"]


# ---------------------------------------------------------------------------------------------- matching

def partition_order(radius_arcsec: float) -> int:
    """The finest HEALPix order (<= 10) whose pixels are at least PIXEL_MARGIN radii across."""
    import astropy.units as u
    from astropy_healpix import nside_to_pixel_resolution

    order = 0
    while (order < MAX_PARTITION_ORDER and
           nside_to_pixel_resolution(2 ** (order + 1)).to_value(u.arcsec) >= PIXEL_MARGIN * radius_arcsec):
        order += 1
    return order


def _with_neighbours(pixels: np.ndarray, order: int) -> np.ndarray:
    from astropy_healpix import neighbours

    nb = np.asarray(neighbours(pixels, 2 ** order, order="nested")).reshape(-1)
    return np.unique(np.concatenate([pixels, nb[nb >= 0]]))


def _match_range(store_path: str, start: int, stop: int, shift: int, order: int, sorted_pix: np.ndarray,
                 sorted_idx: np.ndarray, cat_xyz: np.ndarray, chord: float):
    """Candidates of store rows [start, stop): (catalog rows, store rows, chord distances) within the radius."""
    from scipy.spatial import cKDTree

    cols = open_store(store_path).read_columns(["healpix", "ra", "dec"], slice(start, stop))
    hp = np.asarray(cols["healpix"])
    by_hp = np.argsort(hp, kind="stable")
    hp_sorted = hp[by_hp]
    coarse = hp_sorted >> shift
    pix = coarse[np.r_[True, coarse[1:] != coarse[:-1]]]
    look = _with_neighbours(pix, order)
    lo = np.searchsorted(sorted_pix, look, "left")
    hi = np.searchsorted(sorted_pix, look, "right")
    nonempty = hi > lo
    if not nonempty.any():
        return None
    cand = np.concatenate([sorted_idx[a:b] for a, b in zip(lo[nonempty], hi[nonempty])])
    ra, dec = np.asarray(cols["ra"]), np.asarray(cols["dec"])
    rows = _without_repeated_positions(ra, dec, hp_sorted, by_hp)
    dist, idx = cKDTree(radec_to_xyz(ra[rows], dec[rows])).query(cat_xyz[cand], k=1, distance_upper_bound=chord)
    hit = np.isfinite(dist)
    return cand[hit], start + rows[idx[hit]], dist[hit]


def _without_repeated_positions(ra: np.ndarray, dec: np.ndarray, hp_sorted: np.ndarray, by_hp: np.ndarray) -> np.ndarray:
    """Local rows with a position no lower row has (identical positions: only the lowest row is matched,
    so ties never depend on the KD-tree). Identical positions share their order-29 pixel, so only rows
    in repeated pixels are compared."""
    rows = np.arange(len(ra))
    rep = np.flatnonzero(hp_sorted[1:] == hp_sorted[:-1])
    if not len(rep):
        return rows
    suspects = np.unique(np.concatenate([by_hp[rep], by_hp[rep + 1]]))  # ascending rows
    _, first = np.unique(np.stack([ra[suspects], dec[suspects]], axis=1), axis=0, return_index=True)
    drop = np.setdiff1d(suspects, suspects[first])
    return np.setdiff1d(rows, drop) if len(drop) else rows


def _fold(best_row: np.ndarray, best_d: np.ndarray, part) -> None:
    """Keep, per catalog row, the nearer candidate (equal distance: the lower store row)."""
    if part is None or not len(part[0]):
        return
    c, r, d = part
    order = np.lexsort((r, d, c))
    c, r, d = c[order], r[order], d[order]
    first = np.r_[True, c[1:] != c[:-1]]
    c, r, d = c[first], r[first], d[first]
    better = (d < best_d[c]) | ((d == best_d[c]) & (r < best_row[c]))
    best_row[c[better]] = r[better]
    best_d[c[better]] = d[better]


def match_positions(store: EmbeddingStore, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float, *,
                    workers: int | None = None, task_rows: int = TASK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each (ra, dec) the nearest store row within ``radius_arcsec``: (rows, separations in arcsec),
    row -1 and separation NaN where none; NaN positions never match."""
    import dask
    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    if not (0 < radius_arcsec <= MAX_RADIUS_ARCSEC):
        raise ConfigError(f"--radius must be in (0, {MAX_RADIUS_ARCSEC:g}] arcsec, got {radius_arcsec:g}")
    ra = np.asarray(ra, np.float64)
    dec = np.asarray(dec, np.float64)
    m = len(ra)
    valid = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    order = partition_order(radius_arcsec)
    shift = 2 * (schema.HEALPIX_ORDER - order)
    cat_pix = np.full(m, -1, np.int64)
    if valid.any():
        cat_pix[valid] = np.asarray(lonlat_to_healpix(ra[valid] * u.deg, dec[valid] * u.deg, 2 ** order,
                                                      order="nested"), np.int64)
    keep = np.flatnonzero(valid)
    sorted_idx = keep[np.argsort(cat_pix[keep], kind="stable")]
    sorted_pix = cat_pix[sorted_idx]
    cat_xyz = np.zeros((m, 3))
    cat_xyz[valid] = radec_to_xyz(ra[valid], dec[valid])
    chord = float(chord_from_arcsec(radius_arcsec)) * (1 + 1e-12)

    chunk, _ = store.chunking
    step = max(chunk, task_rows // chunk * chunk)
    n = store.n_rows
    starts = list(range(0, n, step))
    workers = workers or os.cpu_count() or 1
    best_row = np.full(m, -1, np.int64)
    best_d = np.full(m, np.inf)
    task = dask.delayed(_match_range, pure=False)  # no hashing of the catalog arrays per task
    bar = progress.bar(total=n, desc="cross-match", unit="row")
    batch = max(1, 2 * workers)
    for b in range(0, len(starts), batch):
        group = starts[b:b + batch]
        parts = dask.compute(*[task(store.path, s, min(s + step, n), shift, order, sorted_pix, sorted_idx, cat_xyz,
                                    chord) for s in group], scheduler="threads", num_workers=workers)
        for p in parts:
            _fold(best_row, best_d, p)
        bar.update(sum(min(s + step, n) - s for s in group))
    bar.close()
    sep = np.where(best_row >= 0, arcsec_from_chord(np.where(np.isfinite(best_d), best_d, 0.0)), np.nan)
    # the chord bound was widened by rounding slack only; apply the radius exactly
    far = sep > radius_arcsec
    best_row[far], sep[far] = -1, np.nan
    return best_row, sep


def match_keys(store: EmbeddingStore, keys: np.ndarray) -> np.ndarray:
    """The store row whose ``object_id`` equals each key, or -1."""
    import pandas as pd

    keys = np.asarray(keys).astype(str)
    uniq, inverse = np.unique(keys, return_inverse=True)
    lookup = pd.Index(uniq)
    found = np.full(len(uniq), -1, np.int64)
    _, shard = store.chunking
    n = store.n_rows
    for start, cols in progress.bar(store.iter_chunks(["object_id"]), total=-(-n // shard), desc="key join",
                                    unit="chunk"):
        ids = np.asarray(cols["object_id"]).astype(object)
        pos = lookup.get_indexer(ids)
        hit = np.flatnonzero(pos >= 0)
        found[pos[hit]] = start + hit
    return found[inverse]


# ---------------------------------------------------------------------------------------------- output

def _gather(store: EmbeddingStore, name: str, rows: np.ndarray, batch: int = 1_000_000) -> np.ndarray:
    """``store.read(name, rows)`` for sorted unique rows, in batches (reads only the chunks touched)."""
    parts = [store.read(name, rows[i:i + batch]) for i in range(0, len(rows), batch)]
    return np.concatenate(parts) if parts else store.read(name, rows)


def _unique_name(name: str, taken: set[str]) -> str:
    out = name if name not in taken else f"store_{name}"
    i = 1
    while out in taken:
        out, i = f"store_{name}_{i}", i + 1
    taken.add(out)
    return out


def store_columns(store: EmbeddingStore, rows: np.ndarray, *, with_embedding: bool,
                  kept: list[str] | None = None) -> dict[str, "object"]:
    """Arrow arrays of the store's columns for ``rows`` (-1: null), keyed by output name before renaming.

    ``kept``: which of the store's kept catalogue columns (``embed --keep-columns``, ``target_id``) to add;
    None: all of them."""
    import pyarrow as pa

    matched = rows >= 0
    uniq, inverse = np.unique(rows[matched], return_inverse=True)
    mask = ~matched

    def spread(values: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows),) + values.shape[1:], dtype=values.dtype)
        out[matched] = values[inverse]
        return out

    cols: dict[str, object] = {"store_row": pa.array(rows, mask=mask)}
    ids = np.full(len(rows), None, dtype=object)
    ids[matched] = _gather(store, "object_id", uniq).astype(object)[inverse]
    cols["object_id"] = pa.array(ids, type=pa.string())
    cols["store_ra"] = pa.array(spread(_gather(store, "ra", uniq)), mask=mask)
    cols["store_dec"] = pa.array(spread(_gather(store, "dec", uniq)), mask=mask)
    for name in kept_columns(store, kept):
        values = _gather(store, name, uniq)
        if values.dtype.kind in "USO":
            text = np.full(len(rows), None, dtype=object)
            text[matched] = np.asarray(values).astype(object)[inverse]
            cols[name] = pa.array(text, type=pa.string())
        else:
            cols[name] = pa.array(spread(np.asarray(values)), mask=mask)
    cls = classification_of(store)
    if cls is not None:
        labels = np.full(len(rows), None, dtype=object)
        labels[matched] = cls.key_of(_gather(store, "label", uniq))[inverse]
        cols["label"] = pa.array(labels, type=pa.string())
        cols["confidence"] = pa.array(spread(_gather(store, "confidence", uniq)), mask=mask)
        cols["probs"] = _list_column(spread(_gather(store, "probs", uniq)), mask)
    else:
        log.info("%s is not classified: no label/probs/confidence columns (run 'galaxalign-batch classify')", store.path)
    if with_embedding:
        cols["embedding"] = _list_column(spread(_gather(store, "embedding", uniq).astype(np.float32)), mask)
    return cols


def kept_columns(store: EmbeddingStore, kept: list[str] | None = None) -> list[str]:
    """The store's kept catalogue columns to output (all of them for None); ConfigError for an unknown name."""
    have = [c.name for c in getattr(store, "extra_columns", ())]
    if kept is None:
        return have
    unknown = [n for n in kept if n not in have]
    if unknown:
        raise ConfigError(f"--store-columns: the store keeps no column {', '.join(unknown)} (it keeps "
                          f"{', '.join(have) or 'none'}; see embed --keep-columns)")
    return list(kept)


def _list_column(values: np.ndarray, mask: np.ndarray):
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    arr = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if mask.any():  # nulls for unmatched rows
        arr = pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(mask))
    return arr


def join_catalog(store_path: str | os.PathLike, catalog: str | os.PathLike, out: str | os.PathLike, *,
                 radius: float | None = None, on: str | None = None, ra_col: str | None = None,
                 dec_col: str | None = None, catalog_format: str | None = None, with_embedding: bool = False,
                 inner: bool = False, workers: int | None = None, kept: list[str] | None = None) -> JoinSummary:
    """Join ``catalog`` with the store by position (``radius`` in arcsec) or key (``on`` = the catalog column
    holding store object ids) and write ``out`` (Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    out = os.fspath(out)
    if (radius is None) == (on is None):
        raise ConfigError("give either --radius (positional cross-match) or --on COLUMN (key join), not both")
    if not out.lower().endswith((".parquet", ".pq")):
        raise ConfigError(f"--out {out}: the output is a Parquet file (name it .parquet)")
    store = open_readable(store_path)
    table = read_catalog(catalog, catalog_format)
    path = os.fspath(catalog)
    if radius is not None:
        pos = catalog_positions(table, path, ra_col, dec_col)
        rows, sep = match_positions(store, pos.ra, pos.dec, float(radius), workers=workers)
        how = f"within {radius:g} arcsec (nearest, by {pos.ra_col}/{pos.dec_col})"
    else:
        if on not in table.column_names:
            raise CatalogError(f"{path}: no column {on!r} to join on (columns: {', '.join(table.column_names[:12])})")
        keys = table.column(on).to_pylist()
        rows = match_keys(store, np.array(["" if k is None else str(k) for k in keys]))
        sep = None
        how = f"on {on} = object_id"
    added = store_columns(store, rows, with_embedding=with_embedding, kept=kept)
    if sep is not None:
        added = {**{k: v for k, v in added.items() if k in ("store_row", "object_id", "store_ra", "store_dec")},
                 "separation_arcsec": pa.array(sep, mask=rows < 0),
                 **{k: v for k, v in added.items() if k not in ("store_row", "object_id", "store_ra", "store_dec")}}
    taken = set(table.column_names)
    names = []
    for name, arr in added.items():
        final = _unique_name(name, taken)
        table = table.append_column(final, arr)
        names.append(final)
    if inner:
        table = table.filter(pa.array(rows >= 0))
    cls = classification_of(store, warn=False)
    meta = {"store": os.path.abspath(store.path), "catalog": os.path.abspath(path), "how": how,
            "radius_arcsec": radius, "on": on, "model": store.attrs.get("model"),
            "classes": cls.classes if cls else None, "software_version": __version__}
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[b"galaxalign_join"] = json.dumps(meta).encode()
    table = table.replace_schema_metadata(schema_meta)
    with atomic.replacing(out) as tmp:
        pq.write_table(table, tmp)
    matched = int((rows >= 0).sum())
    return JoinSummary(out, len(rows), matched, how, time.perf_counter() - t0, names)
