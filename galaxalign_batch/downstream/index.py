"""Approximate nearest-neighbour indexes (faiss) for stores too large for exact search, saved beside the store.

- ``ivf``: ``IndexIVFScalarQuantizer`` with fp16 codes and inner-product metric: the vectors are
  kept at the store's own precision (N x D x 2 bytes), ``nlist`` ~ 4 sqrt(N) lists, trained (10 k-means
  iterations) on a sample of 40 x nlist rows from whole row chunks; queries probe ``nprobe`` lists.
- ``hnsw``: ``IndexHNSWSQ`` (fp16 codes, ``M`` = 32 links); queries explore ``efSearch`` candidates.

At build time, ``n_eval`` stored rows are searched both exactly (the fused top-k kernel) and with
the index at increasing ``nprobe`` / ``efSearch``; the smallest setting whose recall@10 reaches
``target_recall`` is kept, and the recall table is saved with the index. Files:
``STORE.ivf.faiss`` + ``STORE.ivf.json`` (the JSON is written last: it marks a complete index).
An index whose row count, model or dimension differ from the store's is stale and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from galaxalign_batch import progress
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore

log = logging.getLogger(__name__)

KINDS = ("ivf", "hnsw")
#: Above this many rows `search --index auto` uses (and builds) an IVF index instead of exact search.
APPROX_THRESHOLD = 10_000_000
RECALL_KS = (1, 10, 100)
FORMAT = "galaxalign-faiss-index"


@dataclass
class ApproxIndex:
    kind: str
    index: object  # faiss.Index
    meta: dict
    path: str

    def search(self, queries: np.ndarray, k: int, param: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k) float32, rows (n, k) int64) best first; rows are -1 where fewer than k were found."""
        self.set_param(param if param is not None else int(self.meta["param"]))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, rows = self.index.search(q, k)
        return scores, rows

    def set_param(self, value: int) -> None:
        if self.kind == "ivf":
            self.index.nprobe = int(value)
        else:
            self.index.hnsw.efSearch = int(value)

    def describe(self) -> str:
        m = self.meta
        pname = "nprobe" if self.kind == "ivf" else "efSearch"
        rec = m.get("recall", {}).get(str(m["param"]), {})
        recall = ", ".join(f"recall@{k}={v:.3f}" for k, v in rec.items())
        return (f"approximate ({self.kind}, {pname}={m['param']}): {recall} against exact search, measured on "
                f"{m['n_eval']} stored rows when the index was built ({os.path.basename(self.path)})")


def index_paths(store: EmbeddingStore, kind: str) -> tuple[str, str]:
    base = os.path.normpath(store.path)
    return f"{base}.{kind}.faiss", f"{base}.{kind}.json"


def load_index(store: EmbeddingStore, kind: str) -> ApproxIndex | None:
    """The saved index of ``kind`` when it exists and matches the store, else None (stale ones are logged)."""
    import faiss

    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    path, meta_path = index_paths(store, kind)
    if not (os.path.isfile(path) and os.path.isfile(meta_path)):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    model_id = (store.attrs.get("model") or {}).get("id")
    if (meta.get("format") != FORMAT or meta.get("rows") != store.n_rows or meta.get("model_id") != model_id
            or meta.get("dim") != store.dim):
        log.info("%s is stale (built for %s rows of model %s; the store has %d rows of %s): rebuilding",
                 path, meta.get("rows"), meta.get("model_id"), store.n_rows, model_id)
        return None
    return ApproxIndex(kind, faiss.read_index(path), meta, path)


def _training_sample(store: EmbeddingStore, size: int, seed: int) -> np.ndarray:
    """Up to ``size`` rows from randomly chosen whole chunks (cheap to read, spread over the store)."""
    chunk, _ = store.chunking
    n = store.n_rows
    emb = store.embeddings
    starts = np.arange(0, n, chunk)
    np.random.default_rng(seed).shuffle(starts)
    parts, total = [], 0
    for s in starts:
        if total >= size:
            break
        part = np.asarray(emb[s:min(s + chunk, n)], dtype=np.float32)
        parts.append(part)
        total += len(part)
    return np.ascontiguousarray(np.concatenate(parts)[:size])


def _exact_neighbours(store: EmbeddingStore, queries: np.ndarray, k: int) -> np.ndarray:
    import torch

    from galaxalign_batch import ops

    _, shard = store.chunking
    _, idx = ops.similarity_topk(torch.from_numpy(queries), store.embeddings, k, chunk_rows=shard)
    return idx.numpy()


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    hits = [len(np.intersect1d(a[:k], e[:k])) / k for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def build_index(store: EmbeddingStore, kind: str = "ivf", *, nlist: int | None = None, hnsw_m: int = 32,
                target_recall: float = 0.95, n_eval: int = 256, seed: int = 0) -> ApproxIndex:
    """Build, evaluate and save an index of ``kind`` for every committed row of ``store``."""
    import faiss

    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 < target_recall <= 1:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")
    t0 = time.perf_counter()
    n, d = store.n_rows, store.dim
    if n < 2:
        raise ConfigError(f"{store.path}: an index needs at least 2 rows")
    sq = faiss.ScalarQuantizer.QT_fp16
    if kind == "ivf":
        nlist = int(nlist or max(1, min(65536, round(4 * np.sqrt(n)))))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, sq, faiss.METRIC_INNER_PRODUCT)
        sample = _training_sample(store, min(n, max(40 * nlist, 10_000)), seed)
        log.info("training IVF (%d lists) on %d rows", nlist, len(sample))
        index.cp.niter = 10
        index.train(sample)
        params = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if p <= nlist] or [1]
        if params[-1] != nlist and nlist < 4096:
            params.append(nlist)
        settings = {"nlist": nlist}
    else:
        index = faiss.IndexHNSWSQ(d, sq, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.train(_training_sample(store, min(n, 10_000), seed))
        params = [16, 32, 64, 128, 256, 512, 1024]
        settings = {"M": hnsw_m, "efConstruction": 80}
    _, shard = store.chunking
    emb = store.embeddings
    bar = progress.bar(total=n, desc=f"index ({kind})", unit="row")
    for start in range(0, n, shard):
        rows = np.ascontiguousarray(emb[start:min(start + shard, n)], dtype=np.float32)
        index.add(rows)
        bar.update(len(rows))
    bar.close()
    build_seconds = time.perf_counter() - t0

    rng = np.random.default_rng(seed + 1)
    eval_rows = np.sort(rng.choice(n, size=min(n_eval, n), replace=False))
    queries = np.ascontiguousarray(store.read("embedding", eval_rows), dtype=np.float32)
    kmax = min(max(RECALL_KS), n)
    exact = _exact_neighbours(store, queries, kmax)
    result = ApproxIndex(kind, index, {}, index_paths(store, kind)[0])
    table: dict[str, dict[str, float]] = {}
    chosen = params[-1]
    for p in params:
        _, approx = result.search(queries, kmax, p)
        table[str(p)] = {str(k): round(recall_at(approx, exact, min(k, n)), 4) for k in RECALL_KS if k <= n}
        if table[str(p)][str(min(10, n))] >= target_recall:
            chosen = p
            break
    meta = {"format": FORMAT, "kind": kind, "rows": n, "dim": d, "model_id": (store.attrs.get("model") or {}).get("id"),
            "param": int(chosen), "param_name": "nprobe" if kind == "ivf" else "efSearch", "settings": settings,
            "target_recall": target_recall, "n_eval": int(len(eval_rows)), "recall": table,
            "build_seconds": round(build_seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if table[str(chosen)][str(min(10, n))] < target_recall:
        log.warning("%s index: recall@10 %.3f at the largest setting tried is below the target %.2f",
                    kind, table[str(chosen)][str(min(10, n))], target_recall)
    path, meta_path = index_paths(store, kind)
    faiss.write_index(index, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    result.meta = meta
    log.info("built %s", result.describe())
    return result


def get_index(store: EmbeddingStore, kind: str, *, rebuild: bool = False, **build_kw) -> ApproxIndex:
    """The saved index of ``kind`` for ``store``, built (and saved) first when missing or stale."""
    if not rebuild:
        found = load_index(store, kind)
        if found is not None:
            return found
    return build_index(store, kind, **build_kw)
