"""Label files (CSV ``object_id,label``) and their rows in a store: read, check, look up, embed.

Every problem is a one-line :class:`ConfigError` (labels) or :class:`StoreError` (the store) raised
before anything is written.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore, StoreError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("object_id", "label")
SHOW = 5  # ids quoted in an error


@dataclass
class LabelSet:
    """Labelled objects: ``object_ids[i]`` has class ``classes[y[i]]``."""

    path: str
    object_ids: list[str]
    y: np.ndarray  # int64 indices into classes
    classes: list[str]
    dropped: dict[str, int]  # label -> rows left out (labels not in the chosen classes)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.y, minlength=len(self.classes))
        return {k: int(n) for k, n in zip(self.classes, c)}


def read_labels(path: str | os.PathLike, classes: Sequence[str] | None = None) -> LabelSet:
    """Read a CSV with a header holding ``object_id`` and ``label`` (other columns ignored).

    Classes are ``classes`` in that order (rows with other labels are left out and counted), or every
    label found, sorted. Refused: a missing/unreadable file, no such columns, empty ids or labels,
    one id with two different labels, fewer than two classes, a class without examples.
    """
    path = Path(path)
    rows = _read_rows(path)
    seen: dict[str, tuple[str, int]] = {}
    for line, oid, label in rows:
        if oid in seen and seen[oid][0] != label:
            raise ConfigError(f"{path}: object {oid!r} is labelled both {seen[oid][0]!r} (line {seen[oid][1]}) "
                              f"and {label!r} (line {line})")
        seen.setdefault(oid, (label, line))
    if len(seen) < len(rows):
        log.info("%s: %d repeated row(s) with the same label ignored", path, len(rows) - len(seen))
    found = Counter(label for label, _ in seen.values())
    dropped: dict[str, int] = {}
    if classes is None:
        classes = sorted(found)
    else:
        classes = [str(c).strip() for c in classes]
        if len(set(classes)) != len(classes) or any(not c for c in classes):
            raise ConfigError(f"--classes must be distinct non-empty names, got {classes}")
        dropped = {k: n for k, n in found.items() if k not in classes}
        empty = [c for c in classes if found.get(c, 0) == 0]
        if empty:
            raise ConfigError(f"{path}: class(es) {', '.join(map(repr, empty))} have no labelled example "
                              f"(labels found: {_summary(found)})")
    if len(classes) < 2:
        raise ConfigError(f"{path}: only one class ({_summary(found)}); a head needs labels of at least two classes")
    index = {c: i for i, c in enumerate(classes)}
    ids = [oid for oid, (label, _) in seen.items() if label in index]
    y = np.array([index[seen[oid][0]] for oid in ids], dtype=np.int64)
    return LabelSet(str(path), ids, y, list(classes), dropped)


def _read_rows(path: Path) -> list[tuple[int, str, str]]:
    if not path.is_file():
        raise ConfigError(f"{path}: label file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(65536)
            f.seek(0)
            if "\x00" in sample:
                raise ConfigError(f"{path}: not a text CSV file (binary content)")
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{path}: empty label file (expected a header object_id,label)")
            names = [h.strip().lower() for h in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise ConfigError(f"{path}: no column(s) {', '.join(missing)} in the header "
                                  f"({', '.join(repr(h) for h in header[:8])}); expected a CSV with header object_id,label")
            i_id, i_label = names.index("object_id"), names.index("label")
            rows = []
            for line, rec in enumerate(reader, start=2):
                if not rec or all(not v.strip() for v in rec):
                    continue
                if len(rec) <= max(i_id, i_label):
                    raise ConfigError(f"{path}: line {line} has {len(rec)} field(s), expected at least "
                                      f"{max(i_id, i_label) + 1} (object_id, label)")
                oid, label = rec[i_id].strip(), rec[i_label].strip()
                if not oid or not label:
                    raise ConfigError(f"{path}: line {line}: empty {'object_id' if not oid else 'label'}")
                rows.append((line, oid, label))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text CSV file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ConfigError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise ConfigError(f"{path}: no labelled rows after the header")
    return rows


def _summary(found: Counter) -> str:
    return ", ".join(f"{k!r} {n}" for k, n in sorted(found.items())) or "none"


# ---------------------------------------------------------------------------------------------- the store

def check_embeddings(store: EmbeddingStore) -> None:
    """Refuse a store without an embedding array of committed rows."""
    if "embedding" not in store or "object_id" not in store:
        raise StoreError(f"{store.path}: the store has no embedding/object_id arrays (not an embed output)")
    if store.n_rows == 0:
        raise StoreError(f"{store.path}: the store has no rows yet (run 'galaxalign-batch embed' first)")


def rows_of(store: EmbeddingStore, object_ids: Sequence[str], what: str = "labels") -> np.ndarray:
    """Store rows of ``object_ids`` (same order), streaming the ``object_id`` column; unknown ids are refused."""
    import pandas as pd

    wanted = pd.Index(list(object_ids))
    rows = np.full(len(wanted), -1, dtype=np.int64)
    for start, cols in store.iter_chunks(["object_id"]):
        ids = pd.Index(np.asarray(cols["object_id"]).astype(object))
        pos = ids.get_indexer(wanted) if ids.is_unique else _first_positions(ids, wanted)
        hit = (pos >= 0) & (rows < 0)
        rows[hit] = start + pos[hit]
        if (rows >= 0).all():
            break
    unknown = [oid for oid, r in zip(object_ids, rows) if r < 0]
    if unknown:
        raise ConfigError(f"{what}: {len(unknown)} of {len(wanted)} object id(s) are not in the store {store.path} "
                          f"(e.g. {', '.join(map(repr, unknown[:SHOW]))})")
    return rows


def _first_positions(ids: np.ndarray, wanted) -> np.ndarray:
    first: dict[str, int] = {}
    for i, v in enumerate(ids):
        first.setdefault(v, i)
    return np.array([first.get(w, -1) for w in wanted], dtype=np.int64)


def embeddings_at(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray:
    """(len(rows), D) float32 embeddings of store rows, in the order given."""
    order = np.argsort(rows, kind="stable")
    got = np.asarray(store.read("embedding", np.asarray(rows)[order]), dtype=np.float32)
    out = np.empty_like(got)
    out[order] = got
    return out
