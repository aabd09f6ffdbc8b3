"""The layout of an embedding store: array names, dtypes and chunking (see docs/store.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT = "galaxalign-embedding-store"
#: 2: stores created atomically, one-write commits, every chunk written (also all-fill ones), tile keys
#: from resolved paths (docs/store.md). Version 1 stores are read, never resumed by ``embed``.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: HEALPix order of the ``healpix`` column (nested scheme). Order 29 is the finest an int64 holds
#: (~0.4 mas pixels); the pixel at a coarser order k is ``healpix >> (2 * (29 - k))``.
HEALPIX_ORDER = 29

#: Flags (bit mask in the ``flags`` column).
FLAG_EDGE = 1  # the cutout reaches beyond the tile's edge (padded, masked)
FLAG_MASKED = 2  # some of the cutout has no coverage (masked_fraction > 0)
FLAG_MOSTLY_MASKED = 4  # masked_fraction >= 0.5


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # numpy dtype string, or "str" for variable-length UTF-8
    doc: str


#: One row per source. ``embedding`` is (N, D); every other column is (N,).
ROW_COLUMNS: tuple[Column, ...] = (
    Column("object_id", "str", "stable unique id: release/brick/objid (Tractor) or TILE-KEY/detN (detected)"),
    Column("ra", "float64", "right ascension, degrees (ICRS)"),
    Column("dec", "float64", "declination, degrees (ICRS)"),
    Column("healpix", "int64", f"HEALPix nested pixel at order {HEALPIX_ORDER}"),
    Column("tile", "str", "key of the tile the source was cut from (resolved cube path or brick folder)"),
    Column("x", "float32", "0-based pixel column of the source in its tile"),
    Column("y", "float32", "0-based pixel row of the source in its tile"),
    Column("masked_fraction", "float32", "fraction of the cutout without coverage or outside the tile"),
    Column("flags", "uint16", "bit mask: 1 edge, 2 partly masked, 4 mostly masked"),
)

#: One row per tile that a run finished (done or failed).
TILE_COLUMNS: tuple[Column, ...] = (
    Column("name", "str", "tile key (resolved cube path, or resolved brick folder ROOT/coadd/AAA/BRICK)"),
    Column("status", "int8", "1 done, 2 failed"),
    Column("row_start", "int64", "first row of the tile's sources"),
    Column("row_count", "int64", "number of rows (0 when failed or empty)"),
    Column("reason", "str", "why the tile failed ('' when done)"),
)

STATUS_DONE = 1
STATUS_FAILED = 2

#: optional per-row column types (``--keep-columns``, ``target_id``): numbers and UTF-8 strings
EXTRA_DTYPES = ("str", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float32", "float64")


def fill_value(dtype: str):
    """What an optional column holds for a row whose source lacks it: NaN, 0 (integers, False) or ''."""
    if dtype == "str":
        return ""
    kind = np.dtype(dtype).kind
    return float("nan") if kind == "f" else (False if kind == "b" else 0)


def check_extra_columns(columns) -> tuple[Column, ...]:
    """Optional columns as a tuple of :class:`Column`, checked: known dtypes, names not taken."""
    from galaxalign_batch.errors import ConfigError

    taken = {c.name for c in ROW_COLUMNS} | {"embedding", "tiles"}
    out: list[Column] = []
    for c in columns:
        if c.dtype not in EXTRA_DTYPES:
            raise ConfigError(f"column {c.name!r}: type {c.dtype} cannot be kept (numbers and strings only)")
        if c.name in taken or not c.name or "/" in c.name or c.name.startswith("."):
            raise ConfigError(f"column {c.name!r} cannot be kept under that name (taken by the store, or not a "
                              "plain name)")
        taken.add(c.name)
        out.append(c)
    return tuple(out)


def zarr_dtype(dtype: str):
    return str if dtype == "str" else np.dtype(dtype)


def row_chunks(dim: int, dtype: str) -> tuple[int, int]:
    """(rows per chunk, rows per shard) for the embedding array: ~4 MiB chunks, ~128 MiB shards."""
    row_bytes = max(1, dim * np.dtype(dtype).itemsize)
    chunk = int(2 ** round(np.log2(max(1024, (4 << 20) // row_bytes))))
    return chunk, chunk * 32
