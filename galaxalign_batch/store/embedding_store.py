"""The Zarr v3 embedding store: one row per source, keyed by sky position, written exactly once.

The write protocol (docs/store.md, "Exactly once") in short:

- **Creation** builds the whole store under a temporary name beside its destination and renames
  it into place: a store exists completely or not at all.
- **A commit** writes the rows of whole tiles beyond ``rows_committed`` and their tile records
  beyond ``tiles_committed`` (each file a whole-file replace, :mod:`galaxalign_batch.store.io`),
  fsyncs their folders, then replaces the root ``zarr.json`` once with the new ``rows_committed``,
  ``tiles_committed``, ``commit_serial`` and ``complete``. That single replace is the commit point;
  readers trust only the committed counts, so a writer killed at any moment leaves the previous
  commit intact and the re-run overwrites whatever lies beyond it.
- **One writer**: writes check the store's lease (:mod:`galaxalign_batch.lease`) and that the
  commit record on disk is still the one this writer last wrote.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import zarr

from galaxalign_batch import atomic
from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError, GalaxAlignError
from galaxalign_batch.store import io as store_io
from galaxalign_batch import lease
from galaxalign_batch.store import schema
from galaxalign_batch.store.reading import REQUIRED_ARRAYS, StoreReader

log = logging.getLogger(__name__)

#: the row arrays this class writes (every chunk below ``rows_committed`` exists in a format-2 store)
ROW_ARRAYS = ("embedding",) + tuple(c.name for c in schema.ROW_COLUMNS)
#: the attributes written together at each commit point
COMMIT_KEYS = ("rows_committed", "tiles_committed", "commit_serial")
CREATING = ".creating-"


class StoreError(GalaxAlignError):
    """A store that cannot be opened or does not match what the caller expects."""


class StoreCorruptError(StoreError):
    """Data of a store that cannot be read or cannot be right (a missing chunk, a codec error, a zero row)."""


def _healpix(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    import astropy.units as u
    from astropy_healpix import core as hp

    return np.asarray(hp.lonlat_to_healpix(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg,
                                           2 ** schema.HEALPIX_ORDER, order="nested"), dtype=np.int64)


def as_str(values) -> np.ndarray:
    """A string column (numpy StringDType, object or str) as a fixed-width ``str`` array."""
    return np.asarray(values).astype(object).astype(str)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _all_chunks(arr: zarr.Array) -> zarr.Array:
    """``arr`` configured to write every chunk, also one equal to the fill value: in a store of format 2
    every chunk below ``rows_committed`` exists, so a missing one is always damage."""
    with_config = getattr(arr, "with_config", None)
    return with_config({"write_empty_chunks": True}) if with_config else arr


def creation_leftovers(path: str | os.PathLike) -> list[str]:
    """Temporary folders of store creations that were killed before their rename (beside ``path``)."""
    final = os.path.normpath(os.path.abspath(os.fspath(path)))
    parent, name = os.path.split(final)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if e.startswith(f".{name}{CREATING}"))


class EmbeddingStore(StoreReader):
    """An embedding store on disk. Create with :meth:`create`, open with :meth:`open`.

    Read it with :meth:`read`, :meth:`read_embeddings`, :meth:`read_columns`, :meth:`iter_chunks`,
    :attr:`embeddings`, :meth:`cutouts` (:class:`~galaxalign_batch.store.reading.StoreReader`,
    docs/store.md "Reading a store"); write derived results with
    :class:`~galaxalign_batch.store.derived.DerivedWriter`. ``group`` (the Zarr group) is internal
    to ``galaxalign_batch.store``.
    """

    def __init__(self, group: zarr.Group, path: str, writer: store_io.WriteStore | None = None):
        self.group = group
        self.path = path
        self._writer = writer
        attrs = dict(group.attrs)
        if attrs.get("format") != schema.FORMAT:
            raise StoreError(f"{path}: not a galaxalign embedding store (no format={schema.FORMAT!r} attribute)")
        version = attrs.get("format_version")
        if version not in schema.READABLE_VERSIONS:
            raise StoreError(f"{path}: store format version {version}, this software reads "
                             f"{', '.join(map(str, schema.READABLE_VERSIONS))} (upgrade galaxalign-batch)")
        self.format_version = int(version)
        #: optional per-row columns this store keeps besides the standard ones (``--keep-columns``, ``target_id``)
        self.extra_columns: tuple[schema.Column, ...] = tuple(
            schema.Column(c["name"], c["dtype"], c.get("doc", "")) for c in attrs.get("extra_columns", []))
        self._rows = int(attrs.get("rows_committed", 0))
        self._tiles = int(attrs.get("tiles_committed", 0))
        self._serial = int(attrs.get("commit_serial", 0))
        self._done: set[str] | None = None  # completed tile names, read once, then kept up to date by commit
        self._present: set[tuple[str, str]] = set()  # (array, chunk key) seen on disk

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, *, dtype: str = "float16",
               attrs: Mapping[str, Any] | None = None, rows_per_chunk: int | None = None,
               durable: bool = True, extra_columns: Iterable[schema.Column] = ()) -> "EmbeddingStore":
        """Create a new, empty store for ``dim``-dimensional embeddings (fails if ``path`` exists).

        ``extra_columns``: optional per-row columns besides :data:`schema.ROW_COLUMNS` (catalogue
        columns kept with ``--keep-columns``, ``target_id``), listed in the ``extra_columns`` attribute;
        every commit must then give them too.

        The store is built under ``.NAME.creating-PID-XXXX`` beside ``path`` and renamed into place
        when complete, so a creation killed at any moment leaves no store (and the next creation
        removes the leftover folder).
        """
        final = os.path.normpath(os.fspath(path))
        if os.path.lexists(final):
            raise StoreError(f"{final}: already exists (open it to resume, or choose another --out)")
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"embedding dtype must be float16 or float32, not {dtype!r}")
        lease.check_writable(final)
        extra_columns = schema.check_extra_columns(extra_columns)
        chunk, shard = schema.row_chunks(dim, dtype)
        if rows_per_chunk:
            chunk, shard = rows_per_chunk, rows_per_chunk * 32
        parent = os.path.dirname(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        for old in creation_leftovers(final):
            if lease.held(final) is not None:  # only the lease holder may remove another creation's folder
                shutil.rmtree(old, ignore_errors=True)
        tmp = os.path.join(parent, f".{os.path.basename(final)}{CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        meta = {
            "format": schema.FORMAT, "format_version": schema.FORMAT_VERSION,
            "software_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "healpix_order": schema.HEALPIX_ORDER, "healpix_scheme": "nested",
            "embedding_dim": int(dim), "rows_committed": 0, "tiles_committed": 0, "commit_serial": 0,
            "complete": False, **dict(attrs or {}),
            "extra_columns": [{"name": c.name, "dtype": c.dtype, "doc": c.doc} for c in extra_columns],
        }
        writer = store_io.WriteStore(tmp, durable=durable)
        try:
            group = zarr.open_group(store=writer, mode="w-", attributes=meta)
            group.create_array("embedding", shape=(0, dim), chunks=(chunk, dim), shards=(shard, dim), dtype=dtype,
                               fill_value=0, dimension_names=("row", "feature"))
            for col in schema.ROW_COLUMNS + extra_columns:
                group.create_array(col.name, shape=(0,), chunks=(chunk,), shards=(shard,),
                                   dtype=schema.zarr_dtype(col.dtype), dimension_names=("row",),
                                   fill_value=schema.fill_value(col.dtype) if col in extra_columns else None,
                                   attributes={"description": col.doc})
            tiles = group.create_group("tiles")
            for col in schema.TILE_COLUMNS:
                tiles.create_array(col.name, shape=(0,), chunks=(4096,), dtype=schema.zarr_dtype(col.dtype),
                                   dimension_names=("tile",), attributes={"description": col.doc})
            writer.sync()
            if durable:
                atomic.fsync_dir(tmp)
            store_io._hook(writer, f"rename {tmp} -> {final}")
            try:
                os.rename(tmp, final)  # the creation's commit point
            except OSError as e:
                raise StoreError(f"{final}: could not be created ({e.strerror or e}; another run created it?)") from None
        except Exception:  # (a kill leaves the folder: the next creation under the lock removes it)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if durable:
            atomic.fsync_dir(parent)
        return cls.open(final, "r+", durable=durable)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, durable: bool = True) -> "EmbeddingStore":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise StoreError(f"{path}: no such store")
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            raise StoreError(f"{path}: cannot open as a Zarr group (no zarr.json): not a galaxalign embedding store")
        writer = None
        try:
            if mode == "r":
                group = zarr.open_group(path, mode="r")
            else:
                writer = store_io.WriteStore(path, durable=durable)
                group = zarr.open_group(store=writer, mode="r+")
        except Exception as e:  # zarr raises several types for a directory that is not a group
            raise StoreError(f"{path}: cannot open as a Zarr group ({_one_line(e)})") from None
        return cls(group, path, writer)

    # ---- reading -------------------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_rows(self) -> int:
        return self._rows

    @property
    def n_tiles(self) -> int:
        return self._tiles

    @property
    def dim(self) -> int:
        return int(self.group["embedding"].shape[1])

    def __len__(self) -> int:
        return self._rows

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def _array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise StoreCorruptError(f"{self.path}: array {name} is missing; run 'galaxalign-batch verify "
                                    f"{self.path}'") from None

    @staticmethod
    def chunk_rows(arr: zarr.Array) -> tuple[int, int]:
        """(rows per chunk, rows per shard file) of a row array."""
        chunk = int(arr.chunks[0])
        shard = int(arr.shards[0]) if getattr(arr, "shards", None) else chunk
        return chunk, shard

    def chunk_key(self, name: str, row: int) -> str:
        """The file (store key) that holds ``row`` of array ``name``, e.g. ``embedding/c/3/0``."""
        arr = self.group[name]
        _, shard = self.chunk_rows(arr)
        sep = "/"
        enc = getattr(arr.metadata, "chunk_key_encoding", None)
        if enc is not None and getattr(enc, "separator", "/") != "/":
            sep = enc.separator
        idx = [str(row // shard)] + ["0"] * (arr.ndim - 1)
        return f"{name}/c{sep}{sep.join(idx)}" if sep == "/" else f"{name}/c.{sep.join(idx)}"

    def corrupt(self, name: str, start: int, stop: int, what: str) -> StoreCorruptError:
        """A one-line error naming the store, the array and the chunk of rows ``start..stop``."""
        arr = self.group[name]
        chunk, _ = self.chunk_rows(arr)
        key = self.chunk_key(name, start)
        c0 = start // chunk
        where = f"chunk {c0} (rows {c0 * chunk}-{min((c0 + 1) * chunk, self._rows) - 1}, file {key})"
        return StoreCorruptError(f"{self.path}: array {name}, {where}: {what}; run 'galaxalign-batch verify "
                                 f"{self.path}'")

    def _check_files(self, name: str, rows: np.ndarray | range) -> None:
        """Every shard file holding ``rows`` must exist (a store of format 2 writes them all)."""
        if name not in (("embedding", "object_id", "tile") if self.format_version < 2 else ROW_ARRAYS):
            return  # version-1 stores skipped chunks equal to the fill value; other writers' arrays may too
        arr = self.group[name]
        _, shard = self.chunk_rows(arr)
        root = Path(self.path)
        if isinstance(rows, range):
            shards = range(rows.start // shard, (rows.stop - 1) // shard + 1) if len(rows) else range(0)
        else:
            shards = np.unique(np.asarray(rows, dtype=np.int64) // shard).tolist()
        for s in shards:
            key = self.chunk_key(name, s * shard)
            if (name, key) in self._present:
                continue
            if not (root / key).is_file():
                raise self.corrupt(name, s * shard, min((s + 1) * shard, self._rows),
                                   "its file is missing (deleted?)")
            self._present.add((name, key))

    def _locate_error(self, name: str, rows: Iterable[int], error: BaseException) -> StoreCorruptError:
        """Read chunk by chunk to name the chunk behind a zarr/codec error."""
        arr = self.group[name]
        chunk, _ = self.chunk_rows(arr)
        for c in sorted({int(r) // chunk for r in rows}):
            a, b = c * chunk, min((c + 1) * chunk, self._rows)
            try:
                arr[a:b]
            except Exception as e:
                return self.corrupt(name, a, b, f"cannot be read ({_one_line(e)})")
        r0 = min(int(r) for r in rows) if rows else 0
        return self.corrupt(name, r0, r0 + 1, f"cannot be read ({_one_line(error)})")

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Committed rows of a column (all of them, a slice, or integer indices).

        A missing chunk file or a zarr/codec error raises :class:`StoreCorruptError` (one line naming
        the store, array and chunk); embeddings are not checked here (see :meth:`read_embeddings`).
        """
        arr = self._array(name)
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self._rows)
            span = range(start, max(start, stop))
            self._check_files(name, span)
            try:
                return arr[start:stop:step]
            except Exception as e:
                raise self._locate_error(name, span, e) from None
        idx = np.asarray(rows)
        if idx.size and (idx.min() < 0 or idx.max() >= self._rows):
            raise IndexError(f"row index out of range (store has {self._rows} rows)")
        self._check_files(name, idx)
        try:
            return arr.get_orthogonal_selection((idx,) + ((slice(None),) if arr.ndim == 2 else ()))
        except Exception as e:
            raise self._locate_error(name, idx.tolist(), e) from None

    def read_embeddings(self, rows: slice | np.ndarray | None = None, *, tolerance: float = 0.02) -> np.ndarray:
        """Committed embedding rows (stored dtype), checked: finite and unit-norm (within ``tolerance``).

        Stored embeddings are L2-normalised, so a row of zeros (a chunk that is gone and reads as the
        fill value) or of NaN can only be damage: :class:`StoreCorruptError` naming the chunk.
        """
        raw = np.asarray(self.read("embedding", rows))
        emb = raw.astype(np.float32, copy=False)
        if emb.size and self.attrs_normalised:
            norm = np.sqrt(np.einsum("ij,ij->i", emb, emb))
            bad = ~np.isfinite(norm) | (np.abs(norm - 1.0) > tolerance)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                if rows is None or isinstance(rows, slice):
                    start, _, step = (rows if rows is not None else slice(None)).indices(self._rows)
                    row = start + i * step
                else:
                    row = int(np.asarray(rows)[i])
                kind = "not finite" if not np.isfinite(norm[i]) else f"norm {norm[i]:.3g}, not 1"
                raise self.corrupt("embedding", row, row + 1,
                                   f"{int(bad.sum())} of {len(emb)} rows read are damaged (row {row}: {kind}; "
                                   "a zero row is a missing or zero-filled chunk)")
        return raw

    @property
    def attrs_normalised(self) -> bool:
        return bool(self.group.attrs.get("normalised", True))

    def tile_table(self) -> dict[str, np.ndarray]:
        t = self.group["tiles"]
        out = {}
        for c in schema.TILE_COLUMNS:
            arr = t[c.name]
            try:
                out[c.name] = arr[: self._tiles]
            except Exception as e:
                raise StoreCorruptError(f"{self.path}: array tiles/{c.name} cannot be read ({_one_line(e)}); run "
                                        f"'galaxalign-batch verify {self.path}'") from None
            if len(out[c.name]) != self._tiles:
                raise StoreCorruptError(f"{self.path}: array tiles/{c.name} has {len(out[c.name])} records, the "
                                        f"commit record says {self._tiles}; run 'galaxalign-batch verify {self.path}'")
        return out

    def completed_tiles(self) -> set[str]:
        if self._done is None:
            t = self.tile_table()
            self._done = {str(n) for n, s in zip(t["name"], t["status"]) if s == schema.STATUS_DONE}
        return set(self._done)

    def failed_tiles(self) -> dict[str, str]:
        """Tiles whose every attempt failed, with the last reason (a later success clears a failure)."""
        t = self.tile_table()
        failed = {str(n): str(r) for n, s, r in zip(t["name"], t["status"], t["reason"]) if s == schema.STATUS_FAILED}
        for name in self.completed_tiles():
            failed.pop(name, None)
        return failed

    def tile_rows(self, name: str) -> tuple[int, int] | None:
        """``(row_start, row_count)`` of a tile recorded as done, or None."""
        t = self.tile_table()
        hit = np.flatnonzero((t["name"] == name) & (t["status"] == schema.STATUS_DONE))
        if not len(hit):
            return None
        i = int(hit[-1])
        return int(t["row_start"][i]), int(t["row_count"][i])

    def summary(self) -> list[tuple[str, str]]:
        """``(label, text)`` lines saying what the store holds (``galaxalign-batch info STORE``): rows and
        tiles, the model that made it, its cutouts, its selection, and what was derived from it."""
        a = self.attrs
        lines = [("kind", f"embedding store, format {self.format_version}, "
                          + ("complete" if a.get("complete") else "not complete (re-run embed to finish it)"))]
        failed = len(self.failed_tiles())
        lines.append(("rows", f"{self.n_rows} rows of {self.dim}-d {self.embeddings.dtype} embeddings from "
                              f"{len(self.completed_tiles())} tile(s)" + (f", {failed} failed" if failed else "")))
        model = a.get("model") or {}
        mode = f", mode {model['mode']}" if model.get("mode") else ""
        lines.append(("model", f"{a.get('model_path') or model.get('name')} ({model.get('kind')}, id {model.get('id')}{mode})"
                               + (", RANDOM weights" if a.get("random_weights") else "")))
        spec = a.get("cutout_spec") or {}
        if spec:
            own = (a.get("model_cutout_spec") or {}).get("stretch")
            lines.append(("cutouts", f"{spec.get('angular_size')}\" -> {spec.get('out_size')} px, stretch "
                                     f"{spec.get('stretch')}" + (f" (the model's: {own})" if own else "")
                                     + (f", model in {', '.join(a['precisions'])}" if a.get("precisions") else "")))
        sel = a.get("selection") or {}
        if sel and sel.get("kind") != "all":
            lines.append(("selection", ", ".join(f"{k} {v}" for k, v in sel.items() if isinstance(v, (str, int, float)))))
        cls = a.get("classification") or {}
        if cls:
            lines.append(("classified", f"{len(cls.get('classes') or ())} classes by {cls.get('method')} "
                                        f"({cls.get('rows')} rows, {cls.get('created', '?')})"))
        for name, head in (a.get("fewshot") or {}).items():
            lines.append(("few-shot head", f"{name}: {', '.join(head.get('classes') or ())} "
                                           f"({head.get('kind')}, {head.get('rows')} rows; {head.get('head_file')})"))
        extra = [c.name for c in self.extra_columns]
        if extra:
            lines.append(("columns", ", ".join(extra)))
        for w in a.get("warnings") or ():
            lines.append(("warning", str(w)))
        lines.append(("written", f"created {a.get('created', '?')}, finalised {a.get('finalized', '-')}, "
                                 f"galaxalign-batch {a.get('software_version', '?')}"))
        return lines

    # ---- writing (one writer) ------------------------------------------------------------------------------
    def _on_disk_record(self) -> dict:
        with open(os.path.join(self.path, "zarr.json")) as f:
            attrs = json.load(f).get("attributes", {})
        return {"rows_committed": int(attrs.get("rows_committed", 0)),
                "tiles_committed": int(attrs.get("tiles_committed", 0)),
                "commit_serial": int(attrs.get("commit_serial", 0))}

    def _check_can_write(self) -> None:
        if self._writer is None:
            raise StoreError(f"{self.path}: opened read-only")
        lease.check_writable(self.path)
        ours = {"rows_committed": self._rows, "tiles_committed": self._tiles, "commit_serial": self._serial}
        disk = self._on_disk_record()
        if disk != ours:
            raise StoreError(f"{self.path}: another writer committed to the store since this process opened it "
                             f"(on disk {disk['rows_committed']} rows / {disk['tiles_committed']} tiles, expected "
                             f"{self._rows} / {self._tiles}); stopping without writing")

    def _put_attrs(self, updates: Mapping[str, Any]) -> None:
        """Replace the root ``zarr.json`` once with ``updates`` merged in (the commit point)."""
        assert self._writer is not None
        self._writer.sync()  # every file this commit wrote is durable before the record pointing to it
        self.group.update_attributes(dict(updates))
        if self._writer.durable:
            atomic.fsync_dir(self.path)

    def update_attrs(self, updates: Mapping[str, Any]) -> None:
        """Set some root attributes in one write (not the commit keys)."""
        if set(updates) & set(COMMIT_KEYS):
            raise ValueError(f"{sorted(set(updates) & set(COMMIT_KEYS))} are written by commit only")
        self._check_can_write()
        self._put_attrs({**dict(updates), "commit_serial": self._serial + 1})
        self._serial += 1

    def commit(self, tiles: Iterable[tuple[str, Mapping[str, np.ndarray] | None, str]]) -> int:
        """Write a batch of finished tiles and commit them; returns the rows written.

        ``tiles`` yields ``(name, rows, reason)``: ``rows`` maps every column of
        :data:`schema.ROW_COLUMNS` (``healpix`` and ``flags`` may be left out) plus ``embedding`` to
        arrays of one tile's sources, or is None for a failed tile with its ``reason``.
        """
        tiles = list(tiles)
        if not tiles:
            return 0
        self._check_can_write()
        done = self.completed_tiles()
        parts: dict[str, list[np.ndarray]] = {}
        records = []
        row = self._rows
        names = set()
        for name, rows, reason in tiles:
            if name in done or (name in names and rows is not None):
                raise StoreError(f"{self.path}: tile {name} is already in the store (it would be written twice)")
            names.add(name)
            if rows is None:
                records.append((name, schema.STATUS_FAILED, row, 0, " ".join(str(reason or "failed").split())))
                continue
            rows = self._complete_columns(name, rows)
            n = len(rows["ra"])
            for k, v in rows.items():
                parts.setdefault(k, []).append(v)
            records.append((name, schema.STATUS_DONE, row, n, ""))
            row += n
        if row > self._rows:
            self._write_rows(self._rows, {k: np.concatenate(v) for k, v in parts.items()})
        self._write_tiles(records)
        n_tiles = self._tiles + len(records)
        self._put_attrs({"rows_committed": row, "tiles_committed": n_tiles, "commit_serial": self._serial + 1,
                         "complete": False})
        written = row - self._rows
        self._rows, self._tiles, self._serial = row, n_tiles, self._serial + 1
        self._done |= {name for name, status, *_ in records if status == schema.STATUS_DONE}
        return written

    def _complete_columns(self, name: str, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in rows.items()}
        n = len(out["ra"])
        if "healpix" not in out:
            out["healpix"] = _healpix(out["ra"], out["dec"]) if n else np.zeros(0, np.int64)
        if "flags" not in out:
            mf = out["masked_fraction"]
            out["flags"] = ((mf > 0) * schema.FLAG_MASKED + (mf >= 0.5) * schema.FLAG_MOSTLY_MASKED).astype(np.uint16)
        if "tile" not in out:
            out["tile"] = np.full(n, name)
        expected = {c.name for c in schema.ROW_COLUMNS + self.extra_columns} | {"embedding"}
        if set(out) != expected:
            raise StoreError(f"tile {name}: columns {sorted(set(out) ^ expected)} missing or unexpected")
        if out["embedding"].shape != (n, self.dim):
            raise StoreError(f"tile {name}: embedding shape {out['embedding'].shape}, expected ({n}, {self.dim})")
        for k, v in out.items():
            if len(v) != n:
                raise StoreError(f"tile {name}: column {k} has {len(v)} rows, expected {n}")
        ids = as_str(out["object_id"])
        if n and len(np.unique(ids)) != n:
            raise StoreError(f"tile {name}: {n - len(np.unique(ids))} object id(s) appear twice in the tile")
        if n and (ids == "").any():
            raise StoreError(f"tile {name}: empty object id")
        return out

    def _write_rows(self, start: int, cols: Mapping[str, np.ndarray]) -> None:
        stop = start + len(cols["ra"])
        for name, values in cols.items():
            arr = self.group[name]
            if arr.shape[0] < stop:
                arr.resize((self._capacity(stop, arr),) + arr.shape[1:])
            arr = _all_chunks(self.group[name])
            if name in ("object_id", "tile"):
                arr[start:stop] = values
            elif any(c.name == name and c.dtype == "str" for c in self.extra_columns):
                arr[start:stop] = as_str(values)
            else:
                arr[start:stop] = values.astype(arr.dtype)

    @staticmethod
    def _capacity(needed: int, arr: zarr.Array) -> int:
        shard = arr.shards[0] if arr.shards else arr.chunks[0]
        return int(-(-needed // shard) * shard)

    def _write_tiles(self, records: list[tuple]) -> None:
        t = self.group["tiles"]
        start, stop = self._tiles, self._tiles + len(records)
        for i, col in enumerate(schema.TILE_COLUMNS):
            arr = t[col.name]
            if arr.shape[0] < stop:
                arr.resize((max(stop, 2 * arr.shape[0]),))
            arr = _all_chunks(t[col.name])
            arr[start:stop] = np.array([r[i] for r in records], dtype=schema.zarr_dtype(col.dtype))

    def finalize(self, **attrs: Any) -> None:
        """Trim arrays to the committed rows and mark the store complete (readers then need no attrs)."""
        self._check_can_write()
        for name in ["embedding"] + [c.name for c in schema.ROW_COLUMNS + self.extra_columns]:
            arr = self.group[name]
            if arr.shape[0] != self._rows:
                arr.resize((self._rows,) + arr.shape[1:])
        for col in schema.TILE_COLUMNS:
            arr = self.group["tiles"][col.name]
            if arr.shape[0] != self._tiles:
                arr.resize((self._tiles,))
        self._put_attrs({"complete": True, "finalized": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "commit_serial": self._serial + 1, **attrs})
        self._serial += 1

    def rollback(self, rows: int, tiles: int) -> None:
        """Make the first ``tiles`` tile records and ``rows`` rows the committed part (``verify --repair``).

        Everything beyond becomes invisible and is redone by re-running ``embed``. One write.
        """
        if not (0 <= rows <= self._rows and 0 <= tiles <= self._tiles):
            raise ValueError("rollback can only shrink the committed part")
        self._check_can_write()
        self._put_attrs({"rows_committed": int(rows), "tiles_committed": int(tiles),
                         "commit_serial": self._serial + 1, "complete": False})
        self._rows, self._tiles, self._serial = int(rows), int(tiles), self._serial + 1
        self._done = None

    def remove_leftovers(self) -> int:
        """Remove ``*.partial`` files of killed writes inside the store (the lease holder only)."""
        self._check_can_write()
        return store_io.remove_partials(self.path)


def open_store(path: str | os.PathLike, mode: str = "r") -> EmbeddingStore:
    """Open an existing embedding store."""
    return EmbeddingStore.open(path, mode)


def store_exists(path: str | os.PathLike) -> bool:
    return (Path(path) / "zarr.json").exists()


def open_readable(path: str | os.PathLike) -> "EmbeddingStore":
    """Open a store for reading; refuse one without committed rows or with arrays shorter than them.

    Parameters
    ----------
    path : str or os.PathLike
        The store.

    Returns
    -------
    EmbeddingStore
        Opened read-only. A store whose ``embed`` run has not finished (or crashed) is opened with a
        warning: its committed rows are used.

    Raises
    ------
    StoreError
        No such store, not an embedding store, or no committed rows.
    StoreCorruptError
        One of :data:`REQUIRED_ARRAYS` missing or shorter than the committed rows.
    """
    store = open_store(path, "r")
    if store.n_rows == 0:
        raise StoreError(f"{store.path}: the store has no rows yet (run 'galaxalign-batch embed' first)")
    for name in REQUIRED_ARRAYS:
        if name not in store.group:
            raise StoreCorruptError(f"{store.path}: the store has no {name} array (damaged, or not an embed output); "
                                    f"run 'galaxalign-batch verify {store.path}'")
        if store.group[name].shape[0] < store.n_rows:
            raise StoreCorruptError(f"{store.path}: array {name} has {store.group[name].shape[0]} rows, the commit "
                                    f"record says {store.n_rows}; run 'galaxalign-batch verify {store.path}'")
    if not store.attrs.get("complete", False):
        log.warning("%s: an embed run has not finished (or crashed); using its %d committed rows",
                    store.path, store.n_rows)
    return store
