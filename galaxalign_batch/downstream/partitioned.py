"""`join` at survey scale: HEALPix partitions, a streamed catalogue, one Parquet file per partition.

Used when ``join --out`` is a folder (and always with ``--address``). The same match as
:func:`galaxalign_batch.downstream.join.match_positions` (nearest stored source within the radius;
identical positions: the lower store row), cut so that no process holds the store or the catalogue:

1. **The store's sky map.** Tasks over shards of the store read its ``healpix`` column (8 bytes a
   row) and return, per chunk, which pixels of the *match order* F (pixels >= 30 radii across, as
   the one-file join) it holds and how many rows: a few tens of entries per chunk.
2. **Partitions.** The partition order P <= F is the coarsest at which no pixel holds more than
   ``partition_rows`` store rows (a dense spot finer than F stays whole). A partition's store rows
   are those in its F pixels **plus the F pixels just outside it** (its neighbours' pixels that
   touch it): a catalogue row's match lies in its F pixel or a neighbour. A partition's task reads
   only the chunks holding those pixels.
3. **The catalogue, streamed.** Tasks over row ranges of the catalogue (Parquet row groups, FITS
   row ranges with fitsio; a CSV is streamed by this process) read their range, find each row's
   partition, and spill it, sorted by partition, to an Arrow IPC file (one record batch per
   partition) under ``OUT/_spill``. A partition's task reads its record batches one at a time.
4. **Partition tasks.** A KD-tree on the partition's store rows (unit vectors: no RA wrap or pole
   singularity) answers each catalogue batch; the store columns of the matches are gathered and the
   batch is appended to a temporary file beside ``OUT/part-PP-PIXEL.parquet``
   (:func:`galaxalign_batch.atomic.replacing`), renamed into place when the partition is done. Catalogue rows without a valid position go to ``part-invalid.parquet``.
5. **The manifest** ``OUT/_SUCCESS`` (JSON: the plan, every partition file with its rows and
   matches, totals) is written last, atomically: a folder without it is not a finished join.

Resumable: ``OUT/_plan.json`` records what is joined (store commit, catalogue size and mtime,
radius, options). A re-run with the same plan keeps the partition files already renamed into place
and does the rest (the spill too is kept once its index is written); another plan starts afresh.
Memory of a task: its partition's store rows (~100 bytes each, for the KD-tree) plus one catalogue
batch (``split_rows`` rows); of this process: the sky map and the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from galaxalign_batch import atomic, lease
from galaxalign_batch._version import __version__
from galaxalign_batch.downstream.catalogs import DEC_NAMES, RA_NAMES, _angle_column, catalog_format, find_column
from galaxalign_batch.downstream.common import CatalogError, classification_of
from galaxalign_batch.downstream.distributed import Executor, make_executor, process_bytes_read
from galaxalign_batch.downstream.join import (MAX_RADIUS_ARCSEC, _unique_name, _without_repeated_positions,
                                              kept_columns, partition_order, store_columns)
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.sky import arcsec_from_chord, chord_from_arcsec, radec_to_xyz
from galaxalign_batch.store import open_readable, open_store, schema

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
PLAN = "_plan.json"
SPILL = "_spill"
PARTITION_ROWS = 2_000_000  # store rows per partition (at most, above the match order's pixels)
SPLIT_ROWS = 262_144  # catalogue rows per spill task and per batch a partition task holds
MAP_ROWS = 1 << 20  # store rows per sky-map task
CATALOG_ROW = "catalog_row"
FAULT_ENV = "GALAXALIGN_JOIN_FAULT"  # tests: "KILL:<partition index>[:<marker file>]"
INVALID = -1


@dataclass
class PartitionedJoinSummary:
    out: str
    catalog_rows: int
    matched: int
    partitions: int
    done_before: int
    order: int
    how: str
    seconds: float
    executor: str
    slots: int
    bytes_read: int
    up_to_date: bool = False
    columns: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"{self.out}: already joined ({self.catalog_rows} catalog rows, {self.matched} matched, "
                    f"{self.partitions} partitions); nothing to do (--force to redo)"]
        pct = 100.0 * self.matched / max(self.catalog_rows, 1)
        head = (f"{self.out}: {self.catalog_rows} catalog rows, {self.matched} matched ({pct:.1f}%) {self.how} in "
                f"{self.seconds:.1f} s; {self.partitions} partition files (HEALPix order {self.order}) on "
                f"{self.executor} ({self.slots} slots)")
        if self.done_before:
            head += f", {self.done_before} kept from an earlier run"
        return [head, f"columns added: {', '.join(self.columns)}", f"manifest: {os.path.join(self.out, SUCCESS)}"]


# ---------------------------------------------------------------------------------------------- the catalogue

def catalog_splits(path: str, fmt: str, split_rows: int) -> tuple[list[tuple], int]:
    """Row ranges of the catalogue a task can read alone: ``[(kind, path, ..., first_row)]`` and the row count.
    A CSV is one ``stream`` split (read by this process in batches)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        splits, group, rows, first = [], [], 0, 0
        for i in range(md.num_row_groups):
            group.append(i)
            rows += md.row_group(i).num_rows
            if rows >= split_rows:
                splits.append(("parquet", path, tuple(group), first))
                first, group, rows = first + rows, [], 0
        if group:
            splits.append(("parquet", path, tuple(group), first))
            first += rows
        return splits, first
    if fmt == "fits":
        import fitsio

        with fitsio.FITS(path) as f:
            ext = next((i for i, h in enumerate(f) if h.get_exttype() in ("BINARY_TBL", "ASCII_TBL")), None)
            if ext is None:
                raise CatalogError(f"{path}: no table HDU in the FITS file")
            n = f[ext].get_nrows()
        return [("fits", path, ext, a, min(a + split_rows, n), a) for a in range(0, n, split_rows)], n
    return [("csv", path, 0)], -1


def _fits_table(path: str, ext: int, start: int, stop: int):
    """Rows [start, stop) of a FITS table as Arrow (units in the fields' ``unit`` metadata)."""
    import fitsio
    import pyarrow as pa

    with fitsio.FITS(path) as f:
        hdu = f[ext]
        data = hdu[start:stop]
        hdr = hdu.read_header()
        names = hdu.get_colnames()
    arrays, fields = [], []
    for i, name in enumerate(names, 1):
        col = np.asarray(data[name])
        if col.dtype.kind == "S":
            col = np.char.rstrip(np.char.decode(col, "ascii", "replace"))
        elif col.dtype.kind == "U":
            col = np.char.rstrip(col)
        if col.dtype.byteorder not in ("=", "|"):
            col = col.astype(col.dtype.newbyteorder("="))
        if col.ndim == 1:
            arr = pa.array(col)
        else:
            arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(col).reshape(-1)),
                                                    int(np.prod(col.shape[1:])))
        unit = hdr.get(f"TUNIT{i}")
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata={"unit": str(unit).strip()} if unit else None))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _read_split(split: tuple):
    import pyarrow.parquet as pq

    if split[0] == "parquet":
        return pq.ParquetFile(split[1]).read_row_groups(list(split[2]))
    if split[0] == "fits":
        return _fits_table(split[1], split[2], split[3], split[4])
    raise ValueError(split[0])


def _positions(table, path: str, ra_name: str, dec_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Degrees, NaN where a row has no valid position (as ``catalog_positions``, without its checks)."""
    ra = _angle_column(table, ra_name, path, hours_if_text=True)
    dec = _angle_column(table, dec_name, path, hours_if_text=False)
    valid = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)
    return np.where(valid, np.mod(ra, 360.0), np.nan), np.where(valid, dec, np.nan)


def _spill_table(table, first_row: int, path: str, ra_name: str, dec_name: str, order: int, out: str) -> dict:
    """Sort a catalogue batch by partition and write it as one Arrow IPC file, a record batch per partition."""
    import astropy.units as u
    import pyarrow as pa
    from astropy_healpix import lonlat_to_healpix

    ra, dec = _positions(table, path, ra_name, dec_name)
    n = table.num_rows
    pix = np.full(n, INVALID, np.int64)
    ok = np.isfinite(ra)
    if ok.any():  # at the store's order, then shifted: the same pixel the store's healpix column gives
        hp29 = np.asarray(lonlat_to_healpix(ra[ok] * u.deg, dec[ok] * u.deg, 2 ** schema.HEALPIX_ORDER,
                                            order="nested"), np.int64)
        pix[ok] = hp29 >> (2 * (schema.HEALPIX_ORDER - order))
    by = np.argsort(pix, kind="stable")
    table = table.append_column(CATALOG_ROW, pa.array(first_row + np.arange(n, dtype=np.int64)))
    table = table.append_column("__ra", pa.array(ra)).append_column("__dec", pa.array(dec))
    table = table.take(pa.array(by))
    spix = pix[by]
    starts = np.flatnonzero(np.r_[True, spix[1:] != spix[:-1]]) if n else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], n]
    with atomic.replacing(out) as tmp, pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for a, b in zip(starts, stops):
            w.write_batch(table.slice(int(a), int(b - a)).combine_chunks().to_batches()[0])
    return {"file": out, "pix": spix[starts].tolist(), "rows": (stops - starts).tolist(), "n": n}


def spill_split(split: tuple, path: str, ra_name: str, dec_name: str, order: int, out: str) -> dict:
    """Task: one row range of the catalogue spilled by partition."""
    r0 = process_bytes_read()
    table = _read_split(split)
    res = _spill_table(table, split[-1], path, ra_name, dec_name, order, out)
    res["bytes_read"] = process_bytes_read() - r0
    return res


def _spill_stream(path: str, ra_name: str, dec_name: str, order: int, spill: str, split_rows: int) -> list[dict]:
    """A CSV streamed by this process in batches of about ``split_rows`` rows."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    delim = "\t" if path.lower().endswith(".tsv") else ","
    reader = pcsv.open_csv(path, parse_options=pcsv.ParseOptions(delimiter=delim),
                           read_options=pcsv.ReadOptions(block_size=1 << 22))
    out, first, buf, rows = [], 0, [], 0

    def flush():
        nonlocal first, buf, rows
        table = pa.Table.from_batches(buf)
        out.append(_spill_table(table, first, path, ra_name, dec_name, order,
                                os.path.join(spill, f"split-{len(out):06d}.arrow")))
        first += table.num_rows
        buf, rows = [], 0

    for batch in reader:
        buf.append(batch)
        rows += batch.num_rows
        if rows >= split_rows:
            flush()
    if buf:
        flush()
    return out


def _catalog_schema(path: str, fmt: str):
    """The catalogue's column names, read without reading its rows (a CSV: its first block)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path).names
    if fmt == "fits":
        import fitsio

        with fitsio.FITS(path) as f:
            ext = next((i for i, h in enumerate(f) if h.get_exttype() in ("BINARY_TBL", "ASCII_TBL")), None)
            if ext is None:
                raise CatalogError(f"{path}: no table HDU in the FITS file")
            return f[ext].get_colnames()
    import pyarrow.csv as pcsv

    delim = "\t" if path.lower().endswith(".tsv") else ","
    return pcsv.open_csv(path, parse_options=pcsv.ParseOptions(delimiter=delim)).schema.names


# ---------------------------------------------------------------------------------------------- the store's sky map

def map_rows(store_path: str, start: int, stop: int, shift: int) -> dict:
    """Task: for store rows [start, stop), the (match-order pixel, chunk, rows) triples."""
    r0 = process_bytes_read()
    store = open_store(store_path)
    chunk, _ = store.chunking
    hp = np.asarray(store.read("healpix", slice(start, stop))) >> shift
    ch = (start + np.arange(len(hp), dtype=np.int64)) // chunk
    key = np.stack([hp, ch], axis=1)
    uniq, counts = np.unique(key, axis=0, return_counts=True)
    return {"pix": uniq[:, 0], "chunk": uniq[:, 1], "rows": counts, "bytes_read": process_bytes_read() - r0}


def _neighbours(pixels: np.ndarray, order: int) -> np.ndarray:
    """(n, 8) nested neighbours (-1 where a pixel has 7)."""
    from astropy_healpix import neighbours

    return np.asarray(neighbours(pixels, 2 ** order, order="nested")).T.reshape(len(pixels), 8)


def choose_order(pix: np.ndarray, rows: np.ndarray, match_order: int, partition_rows: int) -> int:
    """The coarsest order <= the match order whose pixels hold at most ``partition_rows`` store rows each."""
    for order in range(0, match_order + 1):
        part = pix >> (2 * (match_order - order))
        _, inv = np.unique(part, return_inverse=True)
        if np.bincount(inv, weights=rows).max(initial=0) <= partition_rows:
            return order
    return match_order


def needed_pixels(pix: np.ndarray, match_order: int, order: int) -> dict[int, np.ndarray]:
    """For each partition, the match-order pixels of the store it must read: its own and those just outside it
    (a pixel is needed by its own partition and by every partition one of its neighbours lies in)."""
    shift = 2 * (match_order - order)
    pix = np.unique(pix)
    nb = _neighbours(pix, match_order)
    parts = np.where(nb >= 0, nb >> shift, -1)
    pairs = np.concatenate([np.stack([pix >> shift, pix], 1)] +
                           [np.stack([parts[:, j], pix], 1)[parts[:, j] >= 0] for j in range(8)])
    pairs = np.unique(pairs, axis=0)
    bounds = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0], True])
    return {int(pairs[a, 0]): pairs[a:b, 1] for a, b in zip(bounds[:-1], bounds[1:])}


def _row_ranges(chunks: np.ndarray, chunk: int, n: int) -> list[tuple[int, int]]:
    """Contiguous row ranges covering sorted unique chunk numbers."""
    if not len(chunks):
        return []
    breaks = np.flatnonzero(np.diff(chunks) != 1)
    firsts = np.r_[chunks[0], chunks[breaks + 1]]
    lasts = np.r_[chunks[breaks], chunks[-1]]
    return [(int(a) * chunk, min(n, (int(b) + 1) * chunk)) for a, b in zip(firsts, lasts)]


# ---------------------------------------------------------------------------------------------- a partition

def partition_file(order: int, pix: int) -> str:
    return "part-invalid.parquet" if pix == INVALID else f"part-{order:02d}-{pix:09d}.parquet"


def join_partition(store_path: str, out_dir: str, order: int, pix: int, ranges: list, needed: np.ndarray,
                   match_order: int, batches: list, radius: float, options: dict, fault: tuple | None) -> dict:
    """Task: match the catalogue rows of one partition and write its Parquet file (atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy.spatial import cKDTree

    r0 = process_bytes_read()
    t0 = time.perf_counter()
    store = open_store(store_path)
    shift = 2 * (schema.HEALPIX_ORDER - match_order)
    rows_l, ra_l, dec_l, hp_l = [], [], [], []
    for a, b in ranges:
        cols = store.read_columns(["healpix", "ra", "dec"], slice(a, b))
        hp = np.asarray(cols["healpix"])
        keep = np.isin(hp >> shift, needed)
        rows_l.append(a + np.flatnonzero(keep))
        ra_l.append(np.asarray(cols["ra"])[keep])
        dec_l.append(np.asarray(cols["dec"])[keep])
        hp_l.append(hp[keep])
    rows = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int64)
    tree = None
    if len(rows):
        ra, dec, hp = np.concatenate(ra_l), np.concatenate(dec_l), np.concatenate(hp_l)
        by_hp = np.argsort(hp, kind="stable")
        local = _without_repeated_positions(ra, dec, hp[by_hp], by_hp)
        rows = rows[local]
        tree = cKDTree(radec_to_xyz(ra[local], dec[local]))
        del ra, dec, hp, by_hp
    chord = float(chord_from_arcsec(radius)) * (1 + 1e-12)
    final = os.path.join(out_dir, partition_file(order, pix))
    writer = None
    n_cat = matched = 0
    store_rows = int(len(rows))
    with atomic.replacing(final) as tmp:
        try:
            for i, (fname, index) in enumerate(batches):
                with pa.memory_map(fname) as src:
                    table = pa.ipc.open_file(src).get_batch(index)
                    table = pa.Table.from_batches([table])
                cat_ra = table.column("__ra").to_numpy()
                cat_dec = table.column("__dec").to_numpy()
                table = table.drop_columns(["__ra", "__dec"])
                m = table.num_rows
                best = np.full(m, -1, np.int64)
                sep = np.full(m, np.nan)
                ok = np.isfinite(cat_ra)
                if tree is not None and ok.any():
                    d, idx = tree.query(radec_to_xyz(cat_ra[ok], cat_dec[ok]), k=1, distance_upper_bound=chord)
                    hit = np.isfinite(d)
                    s = np.full(len(d), np.nan)
                    s[hit] = arcsec_from_chord(d[hit])
                    hit &= s <= radius  # the chord bound was widened by rounding slack only
                    b = np.full(len(d), -1, np.int64)
                    b[hit] = rows[idx[hit]]
                    best[ok], sep[ok] = b, np.where(hit, s, np.nan)
                out = _output_table(store, table, best, sep, options)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, out.schema)
                writer.write_table(out)
                n_cat += m
                matched += int((best >= 0).sum())
                if fault is not None and i == 0:
                    _maybe_die(fault)
            if writer is None:  # no catalogue batch (cannot happen for a planned partition): an empty file
                raise RuntimeError(f"partition {pix}: no catalogue rows")
            writer.close()
            writer = None
        finally:
            if writer is not None:
                writer.close()
    return {"pix": pix, "file": os.path.basename(final), "rows": n_cat, "matched": matched, "store_rows": store_rows,
            "bytes_read": process_bytes_read() - r0, "seconds": time.perf_counter() - t0}


def _maybe_die(fault: tuple) -> None:
    """Tests: kill this worker process half-way through a partition (once, if a marker file is given)."""
    _, marker = fault
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def _output_table(store, table, rows: np.ndarray, sep: np.ndarray, options: dict):
    """The catalogue batch + ``catalog_row`` + the store's columns, named as the one-file join names them."""
    import pyarrow as pa

    added = store_columns(store, rows, with_embedding=options["with_embedding"], kept=options["kept"])
    first = ("store_row", "object_id", "store_ra", "store_dec")
    added = {**{k: v for k, v in added.items() if k in first}, "separation_arcsec": pa.array(sep, mask=rows < 0),
             **{k: v for k, v in added.items() if k not in first}}
    cat_row = table.column(CATALOG_ROW)
    table = table.drop_columns([CATALOG_ROW])
    taken = set(table.column_names)
    table = table.append_column(_unique_name(CATALOG_ROW, taken), cat_row)
    for name, arr in added.items():
        table = table.append_column(_unique_name(name, taken), arr)
    if options["inner"]:
        table = table.filter(pa.array(rows >= 0))
    return table.replace_schema_metadata({b"galaxalign_join": json.dumps(options["meta"]).encode()})


# ---------------------------------------------------------------------------------------------- the driver

def _write_json(path: str, value) -> None:
    atomic.write_json(path, value, durable=True, default=int)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ours(name: str) -> bool:
    return (name.lstrip(".").startswith("part-") and ".parquet" in name) or name in (SUCCESS, PLAN, SPILL) or (
        atomic.is_partial(name) and name.lstrip(".").startswith((SUCCESS, PLAN)))


def _start_afresh(out: str) -> None:
    for name in os.listdir(out):
        p = os.path.join(out, name)
        if name == SPILL:
            shutil.rmtree(p)
        elif _ours(name):
            os.remove(p)


def join_partitioned(store_path: str | os.PathLike, catalog: str | os.PathLike, out: str | os.PathLike, *,
                     radius: float, ra_col: str | None = None, dec_col: str | None = None,
                     catalog_format_: str | None = None, with_embedding: bool = False, inner: bool = False,
                     kept: list[str] | None = None, address: str | None = None, threads: int | None = None,
                     partition_rows: int = PARTITION_ROWS, split_rows: int = SPLIT_ROWS, force: bool = False,
                     retries: int = 3, executor: Executor | None = None,
                     force_unlock: bool = False) -> PartitionedJoinSummary:
    """Cross-match ``catalog`` with the store into the folder ``out`` (module docstring): Ray tasks when
    ``address`` is given (or an ``executor``), else ``threads`` threads of this process.

    The run holds ``out``'s lease (:mod:`galaxalign_batch.lease`): a second join into the same folder at the
    same time is refused with one line (``force_unlock``: take the lease of a run you know is gone).
    """
    t0 = time.perf_counter()
    out = os.path.abspath(os.fspath(out))
    path = os.path.abspath(os.fspath(catalog))
    if not (0 < radius <= MAX_RADIUS_ARCSEC):
        raise ConfigError(f"--radius must be in (0, {MAX_RADIUS_ARCSEC:g}] arcsec, got {radius:g}")
    if out.lower().endswith((".parquet", ".pq")):
        raise ConfigError(f"--out {out}: a partitioned join writes a folder (one Parquet file per partition); "
                          "name it without .parquet")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if not os.path.isfile(path):
        raise CatalogError(f"{path}: catalog not found")
    if partition_rows < 1 or split_rows < 1:
        raise ConfigError("partition_rows and split_rows must be positive")
    with lease.locked(out, force=force_unlock):
        return _join_partitioned(store_path, path, out, t0, radius=radius, ra_col=ra_col, dec_col=dec_col,
                                 catalog_format_=catalog_format_, with_embedding=with_embedding, inner=inner,
                                 kept=kept, address=address, threads=threads, partition_rows=partition_rows,
                                 split_rows=split_rows, force=force, retries=retries, executor=executor)


def _join_partitioned(store_path, path: str, out: str, t0: float, *, radius, ra_col, dec_col, catalog_format_,
                      with_embedding, inner, kept, address, threads, partition_rows, split_rows, force, retries,
                      executor) -> PartitionedJoinSummary:
    fmt = catalog_format(path, catalog_format_)
    store = open_readable(store_path)
    kept = kept_columns(store, kept)
    names = _catalog_schema(path, fmt)
    ra_name = find_column(names, RA_NAMES, ra_col, "RA", path)
    dec_name = find_column(names, DEC_NAMES, dec_col, "Dec", path)
    st = os.stat(path)
    match_order = partition_order(radius)
    plan = {"store": os.path.abspath(store.path), "rows_committed": store.n_rows,
            "commit_serial": store.attrs.get("commit_serial"), "model": (store.attrs.get("model") or {}).get("id"),
            "classification": (store.attrs.get("classification") or {}).get("created"),
            "catalog": path, "catalog_size": st.st_size, "catalog_mtime_ns": st.st_mtime_ns, "format": fmt,
            "ra_col": ra_name, "dec_col": dec_name, "radius_arcsec": float(radius), "match_order": match_order,
            "with_embedding": bool(with_embedding), "inner": bool(inner), "kept": kept,
            "partition_rows": int(partition_rows), "split_rows": int(split_rows)}
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(out, exist_ok=True)
    done_manifest = _read_json(os.path.join(out, SUCCESS))
    if done_manifest and done_manifest.get("plan_digest") == digest and not force:
        return PartitionedJoinSummary(out, done_manifest["catalog_rows"], done_manifest["matched"],
                                      len(done_manifest["partitions"]), 0, done_manifest["order"], "", 0.0, "-", 0, 0,
                                      up_to_date=True)
    others = sorted(n for n in os.listdir(out) if not _ours(n))
    if others:
        raise ConfigError(f"--out {out}: a folder holding other files ({', '.join(others[:3])}); a partitioned join "
                          "writes into a new folder or its own")
    old = _read_json(os.path.join(out, PLAN))
    if force or old is None or old.get("digest") != digest:
        if old is not None:
            log.info("%s: another join's output (other store, catalogue or options, or --force): starting afresh", out)
        _start_afresh(out)
        old = None
        _write_json(os.path.join(out, PLAN), {"digest": digest, "plan": plan})
    if os.path.exists(os.path.join(out, SUCCESS)):
        os.remove(os.path.join(out, SUCCESS))
    atomic.remove_partials(out)  # what workers killed in an earlier run left half-written

    fault = None
    spec = os.environ.get(FAULT_ENV)
    if spec:
        parts = spec.split(":", 2)
        fault = (int(parts[1]), parts[2] if len(parts) > 2 else None)

    own = executor is None
    executor = executor or make_executor(address, threads, retries=retries)
    r_driver = process_bytes_read()
    task_bytes = 0
    try:
        # 1. the store's sky map
        n = store.n_rows
        chunk, shard = store.chunking
        step = max(shard, MAP_ROWS // shard * shard)
        shift = 2 * (schema.HEALPIX_ORDER - match_order)
        maps = [r for _, r in executor.imap_unordered(map_rows, [(store.path, a, min(a + step, n), shift)
                                                                 for a in range(0, n, step)])]
        task_bytes += sum(m["bytes_read"] for m in maps)
        pix = np.concatenate([m["pix"] for m in maps])
        chunks = np.concatenate([m["chunk"] for m in maps])
        counts = np.concatenate([m["rows"] for m in maps])
        order = choose_order(pix, counts, match_order, partition_rows)
        need = needed_pixels(pix, match_order, order)
        by_pix = np.argsort(pix, kind="stable")
        pix_s, chunks_s = pix[by_pix], chunks[by_pix]
        log.info("%s: %d store rows in %d pixels of order %d; partitions at order %d", store.path, n,
                 len(np.unique(pix)), match_order, order)

        # 2. the catalogue, spilled by partition
        spill = os.path.join(out, SPILL)
        index = _read_json(os.path.join(spill, "_index.json"))
        if not index or index.get("order") != order:
            shutil.rmtree(spill, ignore_errors=True)
            os.makedirs(spill)
            splits, _ = catalog_splits(path, fmt, split_rows)
            if not splits:
                raise CatalogError(f"{path}: the catalog has no rows")
            if splits[0][0] == "csv":
                spilled = _spill_stream(path, ra_name, dec_name, order, spill, split_rows)
            else:
                items = [(s, path, ra_name, dec_name, order, os.path.join(spill, f"split-{i:06d}.arrow"))
                         for i, s in enumerate(splits)]
                spilled = [None] * len(items)
                for i, r in executor.imap_unordered(spill_split, items):
                    spilled[i] = r
                    task_bytes += r.pop("bytes_read")
            index = {"order": order, "splits": spilled}
            _write_json(os.path.join(spill, "_index.json"), index)
        catalog_rows = sum(s["n"] for s in index["splits"])
        if catalog_rows == 0:
            raise CatalogError(f"{path}: the catalog has no rows")
        per_part: dict[int, list] = {}
        for s in index["splits"]:
            for k, (p, _) in enumerate(zip(s["pix"], s["rows"])):
                per_part.setdefault(int(p), []).append((s["file"], k))

        # 3. partitions
        cls = classification_of(store, warn=False)
        meta = {"store": os.path.abspath(store.path), "catalog": path,
                "how": f"within {radius:g} arcsec (nearest, by {ra_name}/{dec_name})", "radius_arcsec": radius,
                "on": None, "model": store.attrs.get("model"), "classes": cls.classes if cls else None,
                "partition_order": order, "software_version": __version__}
        options = {"with_embedding": with_embedding, "kept": kept, "inner": inner, "meta": meta}
        todo, results = [], {}
        for p in sorted(per_part):
            fname = partition_file(order, p)
            if os.path.exists(os.path.join(out, fname)) and fname in (old or {}).get("done", {}):
                results[p] = old["done"][fname]
                continue
            needed = need.get(p, np.zeros(0, np.int64)) if p != INVALID else np.zeros(0, np.int64)
            lo = np.searchsorted(pix_s, needed, "left")
            hi = np.searchsorted(pix_s, needed, "right")
            chs = np.unique(np.concatenate([chunks_s[a:b] for a, b in zip(lo, hi)])) if len(needed) else np.zeros(0, np.int64)
            todo.append((store.path, out, order, p, _row_ranges(chs, chunk, n), needed, match_order, per_part[p],
                         float(radius), options, fault if fault and fault[0] == len(todo) else None))
        done_before = len(results)
        if done_before:
            log.info("%s: %d of %d partitions done by an earlier run", out, done_before, len(per_part))
        done_files = {results[p]["file"]: results[p] for p in results}
        try:
            for _, r in executor.imap_unordered(join_partition, todo):
                task_bytes += r["bytes_read"]
                results[r["pix"]] = r
                done_files[r["file"]] = r
                if len(done_files) % 16 == 0:
                    _write_json(os.path.join(out, PLAN), {"digest": digest, "plan": plan, "done": done_files})
        finally:
            _write_json(os.path.join(out, PLAN), {"digest": digest, "plan": plan, "done": done_files})
    finally:
        slots, kind = executor.slots, executor.kind
        if own:
            executor.close()
    bytes_read = task_bytes + (process_bytes_read() - r_driver if kind == "ray" else 0)
    if kind != "ray":  # threads of this process: its own counter holds every task's reads
        bytes_read = process_bytes_read() - r_driver
    matched = sum(r["matched"] for r in results.values())
    manifest = {"format": "galaxalign-join-partitioned", "version": 1, "plan_digest": digest, "plan": plan,
                "order": order, "catalog_rows": catalog_rows, "matched": matched,
                "partitions": [{"file": results[p]["file"], "pixel": p, "rows": results[p]["rows"],
                                "matched": results[p]["matched"]} for p in sorted(results)],
                "software_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    shutil.rmtree(os.path.join(out, SPILL), ignore_errors=True)
    atomic.remove_partials(out)  # of attempts Ray retried after a node or worker was lost
    lease.check_held(out)
    _write_json(os.path.join(out, SUCCESS), manifest)
    added = ["catalog_row", "store_row", "object_id", "store_ra", "store_dec", "separation_arcsec"]
    return PartitionedJoinSummary(out, catalog_rows, matched, len(results), done_before, order, meta["how"],
                                  time.perf_counter() - t0, kind, slots, bytes_read, columns=added)


def read_partitioned(out: str | os.PathLike):
    """A finished partitioned join as one Arrow table in catalogue order (for tests and small outputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = os.fspath(out)
    manifest = _read_json(os.path.join(out, SUCCESS))
    if not manifest:
        raise ConfigError(f"{out}: no {SUCCESS} manifest: not a finished partitioned join")
    tables = [pq.read_table(os.path.join(out, p["file"])) for p in manifest["partitions"]]
    table = pa.concat_tables(tables)
    return table.take(pa.array(np.argsort(table.column(CATALOG_ROW).to_numpy(), kind="stable")))
