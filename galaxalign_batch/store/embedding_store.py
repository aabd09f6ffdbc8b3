"""The Zarr v3 embedding store: one row per source, keyed by sky position, written exactly once.

Writing is done by one writer (the engine's driver) in commits: rows of whole tiles are written
first, then the tile records, then the group attributes ``rows_committed`` / ``tiles_committed``
are replaced atomically (LocalStore writes through a temporary file and a rename). A reader trusts
only the committed counts, so a run killed at any moment leaves a store whose committed part is
consistent; the re-run overwrites whatever lies beyond it and skips the tiles already recorded.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import zarr

from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError, GalaxAlignError
from galaxalign_batch.store import schema

log = logging.getLogger(__name__)


class StoreError(GalaxAlignError):
    """A store that cannot be opened or does not match what the caller expects."""


def _healpix(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    import astropy.units as u
    from astropy_healpix import core as hp

    return np.asarray(hp.lonlat_to_healpix(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg,
                                           2 ** schema.HEALPIX_ORDER, order="nested"), dtype=np.int64)


class EmbeddingStore:
    """An embedding store on disk. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = dict(group.attrs)
        if attrs.get("format") != schema.FORMAT:
            raise StoreError(f"{path}: not a galaxalign embedding store (no format={schema.FORMAT!r} attribute)")
        self._rows = int(attrs.get("rows_committed", 0))
        self._tiles = int(attrs.get("tiles_committed", 0))
        self._done: set[str] | None = None  # completed tile names, read once, then kept up to date by commit

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, *, dtype: str = "float16",
               attrs: Mapping[str, Any] | None = None, rows_per_chunk: int | None = None) -> "EmbeddingStore":
        """Create a new, empty store for ``dim``-dimensional embeddings (fails if ``path`` exists)."""
        path = os.fspath(path)
        if os.path.exists(path):
            raise StoreError(f"{path}: already exists (open it to resume, or choose another --out)")
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"embedding dtype must be float16 or float32, not {dtype!r}")
        chunk, shard = schema.row_chunks(dim, dtype)
        if rows_per_chunk:
            chunk, shard = rows_per_chunk, rows_per_chunk * 32
        group = zarr.open_group(path, mode="w-")
        group.create_array("embedding", shape=(0, dim), chunks=(chunk, dim), shards=(shard, dim), dtype=dtype,
                           fill_value=0, dimension_names=("row", "feature"))
        for col in schema.ROW_COLUMNS:
            group.create_array(col.name, shape=(0,), chunks=(chunk,), shards=(shard,),
                               dtype=schema.zarr_dtype(col.dtype), dimension_names=("row",),
                               attributes={"description": col.doc})
        tiles = group.create_group("tiles")
        for col in schema.TILE_COLUMNS:
            tiles.create_array(col.name, shape=(0,), chunks=(4096,), dtype=schema.zarr_dtype(col.dtype),
                               dimension_names=("tile",), attributes={"description": col.doc})
        meta = {
            "format": schema.FORMAT, "format_version": schema.FORMAT_VERSION,
            "software_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "healpix_order": schema.HEALPIX_ORDER, "healpix_scheme": "nested",
            "embedding_dim": int(dim), "rows_committed": 0, "tiles_committed": 0, "complete": False,
            **dict(attrs or {}),
        }
        group.attrs.update(meta)
        return cls(group, path)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "EmbeddingStore":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise StoreError(f"{path}: no such store")
        try:
            group = zarr.open_group(path, mode=mode)
        except Exception as e:  # zarr raises several types for a directory that is not a group
            raise StoreError(f"{path}: cannot open as a Zarr group ({type(e).__name__}: {e})") from None
        return cls(group, path)

    # ---- reading -------------------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_rows(self) -> int:
        return self._rows

    @property
    def dim(self) -> int:
        return int(self.group["embedding"].shape[1])

    def __len__(self) -> int:
        return self._rows

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Committed rows of a column (all of them, a slice, or integer indices)."""
        arr = self.group[name]
        if rows is None:
            return arr[: self._rows]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self._rows)
            return arr[start:stop:step]
        idx = np.asarray(rows)
        if idx.size and (idx.min() < 0 or idx.max() >= self._rows):
            raise IndexError(f"row index out of range (store has {self._rows} rows)")
        return arr.get_orthogonal_selection((idx,) + ((slice(None),) if arr.ndim == 2 else ()))

    def tile_table(self) -> dict[str, np.ndarray]:
        t = self.group["tiles"]
        return {c.name: t[c.name][: self._tiles] for c in schema.TILE_COLUMNS}

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

    # ---- writing (one writer) ------------------------------------------------------------------------------
    def commit(self, tiles: Iterable[tuple[str, Mapping[str, np.ndarray] | None, str]]) -> int:
        """Write a batch of finished tiles and commit them; returns the rows written.

        ``tiles`` yields ``(name, rows, reason)``: ``rows`` maps every column of
        :data:`schema.ROW_COLUMNS` (``healpix`` and ``flags`` may be left out) plus ``embedding`` to
        arrays of one tile's sources, or is None for a failed tile with its ``reason``.
        """
        tiles = list(tiles)
        if not tiles:
            return 0
        done = self.completed_tiles()
        parts: dict[str, list[np.ndarray]] = {}
        records = []
        row = self._rows
        for name, rows, reason in tiles:
            if name in done:
                raise StoreError(f"{self.path}: tile {name} is already in the store (it would be written twice)")
            if rows is None:
                records.append((name, schema.STATUS_FAILED, row, 0, reason or "failed"))
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
        written = row - self._rows
        self._rows, self._tiles = row, self._tiles + len(records)
        self._done |= {name for name, status, *_ in records if status == schema.STATUS_DONE}
        self.group.attrs.update({"rows_committed": self._rows, "tiles_committed": self._tiles, "complete": False})
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
        expected = {c.name for c in schema.ROW_COLUMNS} | {"embedding"}
        if set(out) != expected:
            raise StoreError(f"tile {name}: columns {sorted(set(out) ^ expected)} missing or unexpected")
        if out["embedding"].shape != (n, self.dim):
            raise StoreError(f"tile {name}: embedding shape {out['embedding'].shape}, expected ({n}, {self.dim})")
        for k, v in out.items():
            if len(v) != n:
                raise StoreError(f"tile {name}: column {k} has {len(v)} rows, expected {n}")
        return out

    def _write_rows(self, start: int, cols: Mapping[str, np.ndarray]) -> None:
        stop = start + len(cols["ra"])
        for name, values in cols.items():
            arr = self.group[name]
            if arr.shape[0] < stop:
                arr.resize((self._capacity(stop, arr),) + arr.shape[1:])
            arr[start:stop] = values if name in ("object_id", "tile") else values.astype(arr.dtype)

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
            arr[start:stop] = np.array([r[i] for r in records], dtype=schema.zarr_dtype(col.dtype))

    def finalize(self, **attrs: Any) -> None:
        """Trim arrays to the committed rows and mark the store complete (readers then need no attrs)."""
        for name in ["embedding"] + [c.name for c in schema.ROW_COLUMNS]:
            arr = self.group[name]
            if arr.shape[0] != self._rows:
                arr.resize((self._rows,) + arr.shape[1:])
        for col in schema.TILE_COLUMNS:
            arr = self.group["tiles"][col.name]
            if arr.shape[0] != self._tiles:
                arr.resize((self._tiles,))
        self.group.attrs.update({"complete": True, "finalized": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 **attrs})


def open_store(path: str | os.PathLike, mode: str = "r") -> EmbeddingStore:
    """Open an existing embedding store."""
    return EmbeddingStore.open(path, mode)


def store_exists(path: str | os.PathLike) -> bool:
    return (Path(path) / "zarr.json").exists()
