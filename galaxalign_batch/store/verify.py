"""``galaxalign-batch verify STORE``: check a whole store and say what to re-run.

Checks, reading every committed chunk once:

- the commit record against the arrays (every row array and tile array at least as long);
- the tile table: statuses, done tiles' row ranges cover ``[0, rows_committed)`` in commit order
  without gaps or overlaps, one done record per tile, the ``tile`` column equal to its record;
- every chunk holding committed rows exists (also inside shard files, from their index) and
  decodes (codec, checksum);
- object ids: non-empty and unique;
- embeddings: finite and unit-norm (a zero row is a lost chunk).

Everything that is wrong maps to the first commit it damages. ``--repair`` (under the store's lock)
rolls the commit record back to just before that commit and removes the damaged shard files; the
same ``embed`` command then re-embeds the tiles that were rolled back, and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from galaxalign_batch.store import schema
from galaxalign_batch.store.embedding_store import (ROW_ARRAYS, EmbeddingStore, StoreError, _one_line, as_str,
                                                    creation_leftovers)
from galaxalign_batch.store.io import PARTIAL_SUFFIX

NORM_TOLERANCE = 0.02
MISSING = np.uint64(2**64 - 1)


@dataclass
class Problem:
    text: str
    first_row: int | None = None  # the first committed row it damages (None: not tied to rows)
    record: int | None = None  # or the first tile record it damages
    files: list[str] = field(default_factory=list)  # damaged files a repair removes


@dataclass
class VerifyReport:
    store: str
    rows: int = 0
    tiles: int = 0
    done: int = 0
    failed: int = 0
    format_version: int = 0
    complete: bool = False
    lock: str | None = None
    leftovers: int = 0
    checked: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rollback: tuple[int, int] | None = None  # (rows, tiles) to keep
    rolled_back_tiles: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        state = "complete" if self.complete else "not finalized (a run is in progress or was killed)"
        out = [f"store: {self.store} (format {self.format_version}, {state}): {self.rows} rows, {self.tiles} tile "
               f"records ({self.done} tiles done, {self.failed} failed)"]
        if self.lock:
            out.append(f"lock: held by {self.lock}")
        out += [f"checked: {c}" for c in self.checked]
        if self.leftovers:
            out.append(f"note: {self.leftovers} temporary file(s)/folder(s) of killed writes (harmless; the next "
                       "writer removes them)")
        if self.ok:
            out.append("OK: every committed row is readable, unique and unit-norm, and the tile table matches")
            return out
        out += [f"PROBLEM {p.text}" for p in self.problems]
        if self.rollback is not None:
            rows, tiles = self.rollback
            n = len(self.rolled_back_tiles)
            if self.repaired:
                out.append(f"repaired: the store now keeps its first {rows} rows ({tiles} tile records); re-run the "
                           f"same 'galaxalign-batch embed' command to re-embed the {n} tile(s) rolled back")
            else:
                eg = ", ".join(self.rolled_back_tiles[:3]) + (", ..." if n > 3 else "")
                out.append(f"to repair: 'galaxalign-batch verify {self.store} --repair' keeps the first {rows} rows "
                           f"({tiles} tile records) and removes the damaged files; then re-run the same "
                           f"'galaxalign-batch embed' command, which re-embeds the {n} tile(s) after them ({eg})")
        else:
            out.append("cannot repair in place: embed into a new store (--out) with the same tiles")
        return out


def _chunk_rows(arr) -> tuple[int, int]:
    return EmbeddingStore.chunk_rows(arr)


def _shard_index(path: Path, n_chunks: int) -> np.ndarray | None:
    """(offset, nbytes) of each inner chunk from a shard file's trailing index, or None if unreadable."""
    size = n_chunks * 16 + 4
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < size:
                return None
            f.seek(-size, os.SEEK_END)
            raw = f.read(size)
    except OSError:
        return None
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)


def _check_array(store: EmbeddingStore, name: str, n: int, report: VerifyReport) -> None:
    """Files, shard index and decoding of every committed chunk of one row array."""
    arr = store.group[name]
    chunk, shard = _chunk_rows(arr)
    sharded = shard != chunk
    per_shard = shard // chunk
    root = Path(store.path)
    kept = {c.name for c in getattr(store, "extra_columns", ())}  # written with every chunk, like the others
    strict = (name in ROW_ARRAYS or name in kept) if store.format_version >= 2 else name in ("embedding", "object_id",
                                                                                             "tile")
    for s0 in range(0, n, shard):
        s1 = min(s0 + shard, n)
        key = store.chunk_key(name, s0)
        f = root / key
        if not f.is_file():
            if strict:
                report.problems.append(Problem(f"array {name}, chunk {s0 // chunk} (rows {s0}-{s1 - 1}, file {key}): "
                                               "missing (deleted?)", first_row=s0, files=[]))
            continue
        if sharded and strict:
            index = _shard_index(f, per_shard)  # the feature axis is one chunk wide
            if index is None:
                report.problems.append(Problem(f"array {name}, file {key} (rows {s0}-{s1 - 1}): shard index "
                                               "unreadable (truncated?)", first_row=s0, files=[key]))
                continue
            for j in range(per_shard):
                r0 = s0 + j * chunk
                if r0 >= n:
                    break
                if index[j, 0] == MISSING and index[j, 1] == MISSING:
                    report.problems.append(Problem(
                        f"array {name}, chunk {r0 // chunk} (rows {r0}-{min(r0 + chunk, n) - 1}, in file {key}): "
                        "missing from its shard", first_row=r0, files=[key]))
                    break
        try:
            arr[s0:s1]
        except Exception:
            bad = None
            for c0 in range(s0, s1, chunk):
                try:
                    arr[c0:min(c0 + chunk, s1)]
                except Exception as e2:
                    bad, e = c0, e2
                    break
            c0 = s0 if bad is None else bad
            report.problems.append(Problem(f"array {name}, chunk {c0 // chunk} (rows {c0}-{min(c0 + chunk, n) - 1}, "
                                           f"file {key}): cannot be read ({_one_line(e)})", first_row=c0, files=[key]))
    return None


def _check_tiles(store: EmbeddingStore, report: VerifyReport) -> dict[str, np.ndarray] | None:
    t = store.group["tiles"]
    n = store.n_tiles
    cols = {}
    for c in schema.TILE_COLUMNS:
        if c.name not in t:
            report.problems.append(Problem(f"array tiles/{c.name} is missing", record=0))
            return None
        arr = t[c.name]
        if arr.shape[0] < n:
            report.problems.append(Problem(f"array tiles/{c.name} has {arr.shape[0]} records, the commit record says "
                                           f"{n}", record=arr.shape[0]))
            return None
        key_root = Path(store.path) / "tiles" / c.name
        for c0 in range(0, n, arr.chunks[0]):
            key = f"tiles/{c.name}/c/{c0 // arr.chunks[0]}"
            if store.format_version >= 2 and not (key_root / "c" / str(c0 // arr.chunks[0])).is_file():
                report.problems.append(Problem(f"array tiles/{c.name}, chunk {c0 // arr.chunks[0]} (records {c0}-"
                                               f"{min(c0 + arr.chunks[0], n) - 1}, file {key}): missing", record=c0))
                return None
        try:
            cols[c.name] = arr[:n]
        except Exception as e:
            report.problems.append(Problem(f"array tiles/{c.name}: cannot be read ({_one_line(e)})", record=0))
            return None
    return cols


def _first_bad_record(table: dict[str, np.ndarray], rows: int, report: VerifyReport) -> None:
    """Statuses and row ranges of the tile records (commit order)."""
    status, start, count = table["status"], table["row_start"].astype(np.int64), table["row_count"].astype(np.int64)
    names = as_str(table["name"])
    expect = 0
    seen: dict[str, int] = {}
    for i in range(len(status)):
        if status[i] not in (schema.STATUS_DONE, schema.STATUS_FAILED):
            report.problems.append(Problem(f"tile record {i} ({names[i]}): unknown status {int(status[i])}", record=i))
            return
        if status[i] == schema.STATUS_FAILED:
            if count[i] != 0:
                report.problems.append(Problem(f"tile record {i} ({names[i]}): failed but holds {count[i]} rows",
                                               record=i))
                return
            continue
        if names[i] in seen:
            report.problems.append(Problem(f"tile {names[i]} is recorded as done twice (records {seen[names[i]]} and "
                                           f"{i}): its sources are in the store twice", record=i))
            return
        seen[names[i]] = i
        if start[i] != expect or count[i] < 0:
            report.problems.append(Problem(f"tile record {i} ({names[i]}): rows {start[i]}+{count[i]}, expected to "
                                           f"start at row {expect} (a gap or an overlap)", record=i))
            return
        expect += int(count[i])
    if expect != rows:
        report.problems.append(Problem(f"the done tiles hold {expect} rows, the commit record says {rows}",
                                       record=len(status)))


def verify_store(path: str | os.PathLike, *, repair: bool = False, step_rows: int | None = None) -> VerifyReport:
    """Check the store at ``path`` (module docstring); with ``repair``, roll back past the first damage."""
    import pandas as pd

    from galaxalign_batch import lease

    store = EmbeddingStore.open(path, "r")
    report = VerifyReport(store.path, rows=store.n_rows, tiles=store.n_tiles, format_version=store.format_version,
                          complete=bool(store.attrs.get("complete", False)))
    holder = lease.lock_status(store.path)
    if holder is not None and holder.stale_reason() is None:
        report.lock = holder.describe() + " (a writer is running: what is checked may change)"
    report.leftovers = len(creation_leftovers(store.path)) + sum(
        f.endswith(PARTIAL_SUFFIX) for _, _, files in os.walk(store.path) for f in files)
    n = store.n_rows

    # the arrays exist and are long enough (the standard ones and the kept catalogue columns)
    row_arrays = ROW_ARRAYS + tuple(c.name for c in getattr(store, "extra_columns", ()))
    short = False
    for name in row_arrays:
        if name not in store.group:
            report.problems.append(Problem(f"array {name} is missing", first_row=0))
            short = True
        elif store.group[name].shape[0] < n:
            have = store.group[name].shape[0]
            report.problems.append(Problem(f"array {name} has {have} rows, the commit record says {n}", first_row=have))
            short = True
    table = _check_tiles(store, report)
    if table is not None:
        status = table["status"]
        report.done = len(set(as_str(table["name"])[status == schema.STATUS_DONE]))
        report.failed = len(store.failed_tiles())
        _first_bad_record(table, n, report)
    if short:
        return _finish(store, table, report, repair)

    # every committed chunk: present, decodable
    for name in row_arrays:
        _check_array(store, name, n, report)
    emb_arr = store.group["embedding"]
    report.checked.append(f"{len(row_arrays)} row arrays, {-(-n // _chunk_rows(emb_arr)[1]) if n else 0} shard "
                          f"file(s) each, {len(schema.TILE_COLUMNS)} tile arrays")

    # values: ids, tile column, norms (one shard at a time)
    bad_files = {p.files[0] for p in report.problems if p.files}
    step = step_rows or _chunk_rows(emb_arr)[1]
    hashes = []
    empty_ids = bad_norm = 0
    first_bad_norm = first_empty = None
    tile_of_row = None
    if table is not None:
        done = table["status"] == schema.STATUS_DONE
        tile_of_row = (as_str(table["name"])[done], table["row_start"][done].astype(np.int64),
                       table["row_count"][done].astype(np.int64))
    wrong_tile = None
    for s0 in range(0, n, step):
        s1 = min(s0 + step, n)
        try:
            ids = np.asarray(store.group["object_id"][s0:s1]).astype(object)
        except Exception:
            ids = None  # reported above
        if ids is not None:
            empty = ids == ""
            if empty.any() and first_empty is None:
                first_empty = s0 + int(np.flatnonzero(empty)[0])
            empty_ids += int(empty.sum())
            hashes.append(pd.util.hash_array(ids))
        try:
            emb = np.asarray(emb_arr[s0:s1], dtype=np.float32)
            norm = np.sqrt(np.einsum("ij,ij->i", emb, emb))
            bad = ~np.isfinite(norm) | (np.abs(norm - 1.0) > NORM_TOLERANCE)
            if bad.any() and store.attrs_normalised:
                bad_norm += int(bad.sum())
                if first_bad_norm is None:
                    first_bad_norm = s0 + int(np.flatnonzero(bad)[0])
        except Exception:
            pass  # reported above
        if tile_of_row is not None and wrong_tile is None:
            try:
                tiles = as_str(store.group["tile"][s0:s1])
            except Exception:
                tiles = None
            if tiles is not None:
                names, starts, counts = tile_of_row
                for nm, a, c in zip(names, starts, counts):
                    lo, hi = max(a, s0), min(a + c, s1)
                    if lo < hi and not (tiles[lo - s0:hi - s0] == nm).all():
                        wrong_tile = (int(lo + np.flatnonzero(tiles[lo - s0:hi - s0] != nm)[0]), nm)
                        break
    if empty_ids:
        report.problems.append(Problem(f"array object_id: {empty_ids} empty id(s), the first at row {first_empty} "
                                       "(a lost chunk reads as empty strings)", first_row=first_empty))
    if bad_norm:
        key = store.chunk_key("embedding", first_bad_norm)
        chunk = _chunk_rows(emb_arr)[0]
        report.problems.append(Problem(
            f"array embedding: {bad_norm} row(s) not finite or not unit-norm, the first at row {first_bad_norm} "
            f"(chunk {first_bad_norm // chunk}, file {key}; a zero row is a lost chunk)", first_row=first_bad_norm,
            files=[key] if key in bad_files else []))
    if wrong_tile is not None:
        report.problems.append(Problem(f"array tile: row {wrong_tile[0]} does not belong to tile {wrong_tile[1]} as "
                                       "the tile table says", first_row=wrong_tile[0]))
    if hashes:
        h = np.concatenate(hashes)
        order = np.argsort(h, kind="stable")
        hs = h[order]
        dup = np.flatnonzero(hs[1:] == hs[:-1])
        if len(dup):
            rows_dup = np.unique(order[dup + 1])  # the later occurrence of each repeated hash
            ids_all = None
            confirmed = []
            for r in rows_dup[:1000]:
                if ids_all is None:
                    ids_all = np.asarray(store.group["object_id"][:n]).astype(object)
                same = np.flatnonzero(ids_all == ids_all[r])
                if len(same) > 1:
                    confirmed.append((int(same[1]), str(ids_all[r]), int(same[0])))
            if confirmed:
                confirmed.sort()
                r, oid, first = confirmed[0]
                report.problems.append(Problem(f"array object_id: {len(confirmed)}{'+' if len(rows_dup) > 1000 else ''} "
                                               f"duplicated id(s), e.g. {oid!r} at rows {first} and {r}", first_row=r))
    report.checked.append(f"{n} object ids (unique, non-empty), {n} embeddings (finite, unit-norm), tile column")
    return _finish(store, table, report, repair)


def _finish(store: EmbeddingStore, table, report: VerifyReport, repair: bool) -> VerifyReport:
    if report.ok:
        return report
    if table is None:
        return report  # the tile table itself is unreadable: no safe rollback point
    status = table["status"]
    start = table["row_start"].astype(np.int64)
    count = table["row_count"].astype(np.int64)
    names = as_str(table["name"])
    keep_records = min([p.record for p in report.problems if p.record is not None], default=len(status))
    first_row = min([p.first_row for p in report.problems if p.first_row is not None], default=None)
    bad_files = sorted({f for p in report.problems for f in p.files})
    root = Path(store.path)
    # a damaged shard file is removed whole: every committed row it holds must be rolled back too
    for key in bad_files:
        arr = store.group[key.split("/c")[0]]
        _, shard = _chunk_rows(arr)
        shard_index = int(key.split("/c/")[1].split("/")[0])
        first_row = min(first_row if first_row is not None else store.n_rows, shard_index * shard)
    if first_row is not None:
        for i in range(len(status)):
            if status[i] == schema.STATUS_DONE and start[i] + count[i] > first_row:
                keep_records = min(keep_records, i)
                break
    keep_rows = 0
    for i in range(keep_records):
        if status[i] == schema.STATUS_DONE:
            keep_rows = max(keep_rows, int(start[i] + count[i]))
    report.rollback = (keep_rows, keep_records)
    report.rolled_back_tiles = list(dict.fromkeys(
        str(nm) for nm, st in zip(names[keep_records:], status[keep_records:]) if st == schema.STATUS_DONE))
    if repair:
        from galaxalign_batch import lease

        with lease.locked(store.path):
            w = EmbeddingStore.open(store.path, "r+")
            if (w.n_rows, w.n_tiles) != (store.n_rows, store.n_tiles):
                raise StoreError(f"{store.path}: the store changed while it was checked; run verify again")
            for key in bad_files:
                try:
                    (root / key).unlink()
                except FileNotFoundError:
                    pass
            w.rollback(keep_rows, keep_records)
            w.remove_leftovers()
        report.repaired = True
    return report
