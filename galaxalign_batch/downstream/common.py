"""What every downstream command shares: errors, opening a store for reading, its classification."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from galaxalign_batch.errors import GalaxAlignError
from galaxalign_batch.store import EmbeddingStore, StoreCorruptError, StoreError, open_store

log = logging.getLogger(__name__)

#: The store attribute that describes a finished classification (see docs/downstream.md).
CLASSIFICATION_ATTR = "classification"
#: The arrays ``classify`` writes, one row per store row.
CLASSIFICATION_ARRAYS = ("probs", "label", "confidence")


class QueryError(GalaxAlignError):
    """A search query that names nothing in the store (unknown id, empty sky region, unreadable image)."""


class CatalogError(GalaxAlignError):
    """A user catalog that cannot be read or matched (format, missing RA/Dec or key column)."""


class ModelMismatchError(StoreError):
    """A model that is not the one the store was embedded with."""


def open_readable(path: str | os.PathLike) -> EmbeddingStore:
    """Open a store for reading; refuse one without committed rows or with arrays shorter than them."""
    store = open_store(path, "r")
    if store.n_rows == 0:
        raise StoreError(f"{store.path}: the store has no rows yet (run 'galaxalign-batch embed' first)")
    for name in ("embedding", "object_id", "ra", "dec"):
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


class RowView:
    """The committed rows of a store's embeddings as a read-only array-like (``.shape``, row slicing).

    Arrays of an unfinished run are longer than ``rows_committed``; this view hides the tail, so
    :func:`galaxalign_batch.ops.similarity_topk` and faiss never see uncommitted rows. Every slice is
    read with :meth:`EmbeddingStore.read_embeddings`: a missing chunk, a codec error or a row that is
    not unit-norm (zeros read from a lost chunk) raises a one-line ``StoreCorruptError`` instead of
    being scored.
    """

    def __init__(self, store: EmbeddingStore):
        self.store = store
        array = store.group["embedding"]
        self.shape = (int(store.n_rows),) + tuple(array.shape[1:])
        self.dtype = array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.store.read_embeddings(key)
        raise TypeError("RowView supports row slices only")


def embedding_view(store: EmbeddingStore) -> RowView:
    return RowView(store)


def row_chunking(store: EmbeddingStore) -> tuple[int, int]:
    """(rows per chunk, rows per shard) of the store's row arrays."""
    emb = store.group["embedding"]
    chunk = int(emb.chunks[0])
    shard = int(emb.shards[0]) if emb.shards else chunk
    return chunk, shard


@dataclass(frozen=True)
class Classification:
    """A finished classification of a store: class keys and labels, and who made it."""

    classes: list[str]
    labels: list[str]
    method: str
    model: dict
    rows: int

    def key_of(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[np.asarray(index, dtype=np.int64)]


def classification_of(store: EmbeddingStore, *, warn: bool = True) -> Classification | None:
    """The store's classification when ``classify`` finished one covering every committed row, else None."""
    meta = store.attrs.get(CLASSIFICATION_ATTR)
    if not meta or not all(name in store.group for name in CLASSIFICATION_ARRAYS):
        return None
    if int(meta.get("rows", -1)) != store.n_rows:
        if warn:
            log.warning("%s: the classification covers %s rows but the store has %d (embed added rows since): "
                        "re-run 'galaxalign-batch classify'; ignoring it", store.path, meta.get("rows"), store.n_rows)
        return None
    return Classification(list(meta["classes"]), list(meta.get("labels", meta["classes"])), str(meta["method"]),
                          dict(meta.get("model", {})), int(meta["rows"]))


def parse_angle_arcsec(text: str | float, what: str = "radius") -> float:
    """An angle such as ``1arcsec``, ``0.5 arcmin``, ``2e-4 deg`` or a bare number (arcsec) -> arcsec."""
    import astropy.units as u

    from galaxalign_batch.errors import ConfigError

    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s)
        except ValueError:
            try:
                q = u.Quantity(s)
                value = float(q.to_value(u.arcsec))
            except (TypeError, ValueError, u.UnitsError):
                raise ConfigError(f"{what} {text!r}: expected an angle such as 1arcsec, 0.5arcmin or 0.001deg") from None
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive angle, got {text!r}")
    return value


def radec_to_xyz(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (N, 3) of ICRS positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def chord_from_arcsec(arcsec: float | np.ndarray) -> np.ndarray | float:
    return 2.0 * np.sin(np.radians(np.asarray(arcsec, dtype=np.float64) / 3600.0) / 2.0)


def arcsec_from_chord(chord: np.ndarray | float) -> np.ndarray | float:
    return np.degrees(2.0 * np.arcsin(np.clip(np.asarray(chord, dtype=np.float64) / 2.0, 0.0, 1.0))) * 3600.0


# ------------------------------------------------------------------ per-row probabilities (classify, fewshot)

def create_prob_arrays(group, store: EmbeddingStore, n: int, k: int, probs_description: str) -> None:
    """``probs`` (n, k) float32, ``label`` (n,) int16 and ``confidence`` (n,) float32 in ``group``,
    with the store's row chunking and sharding."""
    chunk, shard = row_chunking(store)
    group.create_array("probs", shape=(n, k), chunks=(chunk, k), shards=(shard, k), dtype="float32",
                       fill_value=0.0, dimension_names=("row", "class"),
                       attributes={"description": probs_description})
    group.create_array("label", shape=(n,), chunks=(chunk,), shards=(shard,), dtype="int16", fill_value=-1,
                       dimension_names=("row",), attributes={"description": "index of the most probable class"})
    group.create_array("confidence", shape=(n,), chunks=(chunk,), shards=(shard,), dtype="float32", fill_value=0.0,
                       dimension_names=("row",), attributes={"description": "probability of the label"})


def write_probs(group, score, n: int, done: int, step: int, desc: str) -> None:
    """Fill ``group``'s prob arrays for rows ``done..n`` in batches of ``step`` rows (whole chunks).

    ``score(start, stop)`` gives the (stop - start, K) probabilities; each batch ends with an atomic
    update of ``rows_done``, the commit point a killed run resumes from.
    """
    from galaxalign_batch import progress

    bar = progress.bar(total=n, initial=done, desc=desc, unit="row")
    try:
        for start in range(done, n, step):
            stop = min(start + step, n)
            probs = score(start, stop)
            label = probs.argmax(1)
            group["probs"][start:stop] = probs
            group["label"][start:stop] = label.astype(np.int16)
            group["confidence"][start:stop] = probs[np.arange(len(label)), label]
            group.attrs.update({"rows_done": stop})  # the commit point of this batch
            bar.update(stop - start)
    finally:
        bar.close()


def label_counts(store: EmbeddingStore, label_array, classes) -> dict[str, int]:
    """How many committed rows have each label in ``label_array`` (read one shard at a time)."""
    k = len(classes)
    total = np.zeros(k, np.int64)
    step = row_chunking(store)[1]
    for start in range(0, store.n_rows, step):
        try:
            lab = np.asarray(label_array[start:min(start + step, store.n_rows)], dtype=np.int64)
        except Exception as e:  # a damaged chunk of the label array: one line, not a traceback
            raise StoreCorruptError(f"{store.path}: array {label_array.path}, rows {start}-"
                                    f"{min(start + step, store.n_rows) - 1}: cannot be read "
                                    f"({type(e).__name__}: {' '.join(str(e).split())})") from None
        total += np.bincount(lab[lab >= 0], minlength=k)[:k]
    return {c: int(v) for c, v in zip(classes, total)}
