"""Which galaxy to show next: embedding clustering first, then uncertainty sampling with diversity.

The store is read in row batches (never whole), so this works on stores of 10^5-10^6 rows and more:

- :class:`Clusters`: spherical k-means (faiss) on a sample of whole chunks, then every row's nearest
  centroid and its cosine to it, streamed once and cached beside the label database;
- the *first round* (no head yet): rows nearest their centroid, taken round-robin over the clusters
  (largest first), so the first screens span the whole embedding space;
- after each retrain, :meth:`ActiveQueue.rescore` streams the store once through the head, keeps the
  margin ``p1 - p2`` of every row and a pool of the most uncertain unlabelled rows with their
  embeddings; the pool is ordered by uncertainty round-robin over clusters, and a row whose cosine to
  one of the previous few picks exceeds ``dup_cosine`` is pushed back (no near-duplicates on one screen).
  Labelling a row only flips a bit; nothing is rescored per click.

Two tabs: the rows a page holds (current + upcoming) are *leased* to its session for ``lease_s``
seconds and not served to another session meanwhile; labels themselves are per object (last wins).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from galaxalign_batch import atomic
from galaxalign_batch.errors import NPZ_READ_ERRORS
from galaxalign_batch.progress import bar
from galaxalign_batch.store import EmbeddingStore

log = logging.getLogger(__name__)


def _batches(store: EmbeddingStore, rows_per_batch: int | None = None):
    """``(start, float32 embeddings)`` of consecutive row batches of the committed rows."""
    chunk, _ = store.chunking
    step = rows_per_batch or chunk * max(1, 16384 // chunk)  # whole chunks, ~16k rows (tens of MiB)
    for start, cols in store.iter_chunks(["embedding"], step=step):
        yield start, np.asarray(cols["embedding"], dtype=np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class IdIndex:
    """object_id -> row for the whole store, as a sorted byte-string array (about 20 bytes a row)."""

    def __init__(self, store: EmbeddingStore):
        chunk, _ = store.chunking
        parts = []
        for _, cols in store.iter_chunks(["object_id"], step=chunk * 16):
            ids = np.asarray(cols["object_id"])
            parts.append(np.strings.encode(ids.astype(np.dtypes.StringDType()), "utf-8"))
        ids = np.concatenate(parts) if parts else np.zeros(0, "S1")
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]

    def row(self, object_id: str) -> int | None:
        """The row of ``object_id``, or None when the store has no such object."""
        key = object_id.encode("utf-8")
        i = int(np.searchsorted(self.sorted, key))
        if i < len(self.sorted) and self.sorted[i] == key:
            return int(self.order[i])
        return None


@dataclass
class Clusters:
    """Every row's k-means cluster and cosine to its centroid."""

    centroids: np.ndarray  # (k, D) float32, unit length
    label: np.ndarray      # (N,) int32
    cosine: np.ndarray     # (N,) float32

    @classmethod
    def compute(cls, store: EmbeddingStore, k: int | None = None, *, sample_rows: int = 50_000,
                seed: int = 0) -> "Clusters":
        import faiss

        n = store.n_rows
        k = k or int(np.clip(round(np.sqrt(n) / 2), 2, 100))
        k = max(1, min(k, n))
        view = store.embeddings
        chunk, _ = store.chunking
        rng = np.random.default_rng(seed)
        starts = np.arange(0, n, chunk)
        rng.shuffle(starts)
        sample, have = [], 0
        for s in starts:  # whole random chunks: cheap to read, spread over the store
            part = np.asarray(view[int(s):int(s) + chunk], dtype=np.float32)
            sample.append(part)
            have += len(part)
            if have >= sample_rows:
                break
        x = _normalise(np.concatenate(sample))
        if len(x) > sample_rows:
            x = x[rng.choice(len(x), sample_rows, replace=False)]
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, sample_rows // k + 1), verbose=False)
        km.train(np.ascontiguousarray(x))
        cent = _normalise(km.centroids.astype(np.float32))
        index = faiss.IndexFlatIP(cent.shape[1])
        index.add(cent)
        label = np.empty(n, np.int32)
        cosine = np.empty(n, np.float32)
        with bar(total=n, desc="clustering", unit="row") as pbar:
            for start, e in _batches(store):
                d, i = index.search(np.ascontiguousarray(_normalise(e)), 1)
                label[start:start + len(e)] = i[:, 0]
                cosine[start:start + len(e)] = d[:, 0]
                pbar.update(len(e))
        return cls(cent, label, cosine)

    @classmethod
    def cached(cls, store: EmbeddingStore, path: str, **kw) -> "Clusters":
        """Load the clustering from ``path`` when it was made for this store's rows and model, else compute it."""
        key = f"{store.n_rows}|{(store.attrs.get('model') or {}).get('id')}|{store.dim}"
        if os.path.exists(path):
            try:
                with np.load(path) as z:
                    if str(z["key"]) == key:
                        return cls(z["centroids"], z["label"], z["cosine"])
            except NPZ_READ_ERRORS as e:
                log.warning("%s: ignoring an unreadable cluster cache (%s: %s)", path, type(e).__name__, e)
        c = cls.compute(store, **kw)
        with atomic.replacing(path) as tmp:
            np.savez(tmp, key=np.array(key), centroids=c.centroids, label=c.label, cosine=c.cosine)
        return c

    def first_round(self) -> np.ndarray:
        """All rows: the nearest-to-centroid row of every cluster (largest cluster first), then the second, ..."""
        n = len(self.label)
        by_cluster = np.lexsort((-self.cosine, self.label))  # cluster, then cosine descending
        lab = self.label[by_cluster]
        first = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]
        rank = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
        size = np.bincount(self.label, minlength=len(self.centroids))
        cluster_order = np.argsort(np.argsort(-size, kind="stable"), kind="stable")  # 0 = largest
        return by_cluster[np.lexsort((cluster_order[lab], rank))]


def diverse_order(rows: np.ndarray, score: np.ndarray, cluster: np.ndarray, emb: np.ndarray | None = None, *,
                  window: int = 8, dup_cosine: float = 0.995) -> np.ndarray:
    """``rows`` ordered by ``score`` (lower first) round-robin over clusters, near-duplicates pushed back.

    A row whose embedding has cosine > ``dup_cosine`` with one of the last ``window`` rows picked goes to
    the end (it would show the same galaxy twice on one screen).
    """
    if not len(rows):
        return rows
    by = np.lexsort((score, cluster))
    c = cluster[by]
    first = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
    rank = np.arange(len(by)) - np.repeat(first, np.diff(np.r_[first, len(by)]))
    order = by[np.lexsort((score[by], rank))]
    if emb is None:
        return rows[order]
    e = _normalise(np.asarray(emb, np.float32))
    picked, deferred = [], []
    for i in order:
        recent = picked[-window:]
        if recent and float(np.max(e[recent] @ e[i])) > dup_cosine:
            deferred.append(i)
        else:
            picked.append(i)
    return rows[np.array(picked + deferred, dtype=np.int64)]


def margins(probs: np.ndarray) -> np.ndarray:
    """``p1 - p2`` per row (0 = a tie between the two most probable classes, 1 = certain)."""
    p = np.asarray(probs, np.float32)
    if p.shape[1] < 2:
        return np.ones(len(p), np.float32)
    top = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return (top[:, 1] - top[:, 0]).astype(np.float32)


class ActiveQueue:
    """Serves rows to label, per session, from the current ranking (see the module docstring)."""

    def __init__(self, store: EmbeddingStore, clusters: Clusters, labelled_rows, *, pool: int = 2048,
                 lease_s: float = 600.0, window: int = 8, dup_cosine: float = 0.995):
        self.store = store
        self.clusters = clusters
        self.n = store.n_rows
        self.pool_size = pool
        self.lease_s = lease_s
        self.window, self.dup_cosine = window, dup_cosine
        self.labelled = np.zeros(self.n, bool)
        self.labelled[np.asarray(list(labelled_rows), dtype=np.int64)] = True
        self.base = clusters.first_round()           # every row, first-round order
        self.ranking = np.zeros(0, np.int64)         # uncertainty order of the current head's pool
        self.margin: np.ndarray | None = None        # the current head's margin of every row
        self.ranked_by = 0                           # head version of `ranking` (0: clustering only)
        self._leases: dict[int, tuple[str, float]] = {}
        self._held: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    # ---- per click -----------------------------------------------------------------------------------------
    def set_labelled(self, row: int, labelled: bool = True) -> None:
        with self._lock:
            self.labelled[row] = labelled
            if labelled:
                self._leases.pop(row, None)

    def put_front(self, session: str, row: int) -> None:
        """Show ``row`` next to ``session`` (after an undo)."""
        with self._lock:
            held = [r for r in self._held.get(session, []) if r != row]
            self._held[session] = [row] + held
            self._leases[row] = (session, time.monotonic() + self.lease_s)

    def next(self, session: str, n: int) -> list[int]:
        """The rows ``session`` should show: those it holds (still unlabelled) first, then new ones, leased to it."""
        now = time.monotonic()
        with self._lock:
            held = [r for r in self._held.get(session, []) if not self.labelled[r]
                    and self._leases.get(r, (session, 0))[0] == session][:n]
            taken = set(held)

            def free(r: int) -> bool:
                if self.labelled[r] or r in taken:
                    return False
                lease = self._leases.get(r)
                return lease is None or lease[0] == session or lease[1] < now

            for source in (self.ranking, self.base):
                if len(held) >= n:
                    break
                for r in source:
                    r = int(r)
                    if free(r):
                        held.append(r)
                        taken.add(r)
                        if len(held) >= n:
                            break
            for r in self._held.get(session, []):
                if r not in taken and self._leases.get(r, ("", 0))[0] == session:
                    self._leases.pop(r, None)
            for r in held:
                self._leases[r] = (session, now + self.lease_s)
            self._held[session] = held
            if len(self._leases) > 10_000:
                self._leases = {r: v for r, v in self._leases.items() if v[1] >= now}
            return held

    def remaining(self) -> int:
        return int(self.n - np.count_nonzero(self.labelled))

    # ---- per retrain ---------------------------------------------------------------------------------------
    def rescore(self, head, version: int, *, stop: threading.Event | None = None) -> None:
        """Score every row with ``head`` (streamed) and re-rank; the sessions keep only the row they show."""
        labelled = self.labelled.copy()
        margin = np.empty(self.n, np.float32)
        pool_m = np.zeros(0, np.float32)
        pool_r = np.zeros(0, np.int64)
        pool_e = np.zeros((0, self.store.dim), np.float32)
        for start, e in _batches(self.store):
            if stop is not None and stop.is_set():
                return
            m = margins(head.predict_proba(e))
            margin[start:start + len(e)] = m
            cand = np.flatnonzero(~labelled[start:start + len(e)])
            if len(cand) > self.pool_size:
                cand = cand[np.argpartition(m[cand], self.pool_size - 1)[:self.pool_size]]
            pool_m = np.concatenate([pool_m, m[cand]])
            pool_r = np.concatenate([pool_r, start + cand])
            pool_e = np.concatenate([pool_e, e[cand]])
            if len(pool_m) > self.pool_size:
                keep = np.argpartition(pool_m, self.pool_size - 1)[:self.pool_size]
                pool_m, pool_r, pool_e = pool_m[keep], pool_r[keep], pool_e[keep]
        ranking = diverse_order(pool_r, pool_m, self.clusters.label[pool_r], pool_e, window=self.window,
                                dup_cosine=self.dup_cosine)
        with self._lock:
            self.margin, self.ranking, self.ranked_by = margin, ranking, version
            for s, held in self._held.items():  # the shown row stays; the upcoming ones follow the new ranking
                for r in held[1:]:
                    if self._leases.get(r, ("", 0))[0] == s:
                        self._leases.pop(r, None)
                self._held[s] = held[:1]
