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

Beyond one machine's memory (codes over ``SHARD_BYTES``, or ``shard_rows`` given), ``ivf`` is built as
HEALPix shards (:func:`build_sharded_index`): one quantizer trained on a sample, each shard filled by a
task that streams only its sky region's chunks (``STORE.ivf.shard-NNNN.faiss``, rows as ids); the JSON
lists the shards. A query fans out over the shards (memory-mapped) and merges their top-k.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from galaxalign_batch import atomic, progress
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
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    sharded = bool(meta.get("shards"))
    if not sharded and not os.path.isfile(path):
        return None
    model_id = (store.attrs.get("model") or {}).get("id")
    if (meta.get("format") != FORMAT or meta.get("rows") != store.n_rows or meta.get("model_id") != model_id
            or meta.get("dim") != store.dim):
        log.info("%s is stale (built for %s rows of model %s; the store has %d rows of %s): rebuilding",
                 path, meta.get("rows"), meta.get("model_id"), store.n_rows, model_id)
        return None
    if sharded:
        found = ShardedIndex(kind, None, meta, path)
        if all(os.path.isfile(f) for f in found.shard_files()):
            return found
        log.info("%s: a shard file is missing: rebuilding", meta_path)
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


def _tune(result, store, params, n_eval: int, target_recall: float, seed: int):
    """The smallest search setting of ``params`` whose recall@10 against exact search reaches
    ``target_recall`` on ``n_eval`` stored rows (else the largest): ``(chosen, recall table, eval rows)``."""
    n = store.n_rows
    rng = np.random.default_rng(seed + 1)
    eval_rows = np.sort(rng.choice(n, size=min(n_eval, n), replace=False))
    queries = np.ascontiguousarray(store.read("embedding", eval_rows), dtype=np.float32)
    kmax = min(max(RECALL_KS), n)
    exact = _exact_neighbours(store, queries, kmax)
    table: dict[str, dict[str, float]] = {}
    chosen = params[-1]
    for p in params:
        _, approx = result.search(queries, kmax, p)
        table[str(p)] = {str(k): round(recall_at(approx, exact, min(k, n)), 4) for k in RECALL_KS if k <= n}
        if table[str(p)][str(min(10, n))] >= target_recall:
            chosen = p
            break
    return chosen, table, eval_rows


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
                target_recall: float = 0.95, n_eval: int = 256, seed: int = 0, shard_rows: int | None = None,
                address: str | None = None) -> ApproxIndex:
    """Build, evaluate and save an index of ``kind`` for every committed row of ``store``.

    ``ivf`` is built in HEALPix shards (:func:`build_sharded_index`, on a Ray cluster with ``address``) when
    ``shard_rows`` or ``address`` is given or its codes would exceed :data:`SHARD_BYTES`."""
    import faiss

    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 < target_recall <= 1:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")
    t0 = time.perf_counter()
    n, d = store.n_rows, store.dim
    if n < 2:
        raise ConfigError(f"{store.path}: an index needs at least 2 rows")
    if kind == "ivf" and (shard_rows or address or n * d * 2 > SHARD_BYTES):
        return build_sharded_index(store, shard_rows=int(shard_rows or SHARD_BYTES // (2 * d)), nlist=nlist,
                                   target_recall=target_recall, n_eval=n_eval, seed=seed, address=address)
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

    result = ApproxIndex(kind, index, {}, index_paths(store, kind)[0])
    chosen, table, eval_rows = _tune(result, store, params, n_eval, target_recall, seed)
    meta = {"format": FORMAT, "kind": kind, "rows": n, "dim": d, "model_id": (store.attrs.get("model") or {}).get("id"),
            "param": int(chosen), "param_name": "nprobe" if kind == "ivf" else "efSearch", "settings": settings,
            "target_recall": target_recall, "n_eval": int(len(eval_rows)), "recall": table,
            "build_seconds": round(build_seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if table[str(chosen)][str(min(10, n))] < target_recall:
        log.warning("%s index: recall@10 %.3f at the largest setting tried is below the target %.2f",
                    kind, table[str(chosen)][str(min(10, n))], target_recall)
    path, meta_path = index_paths(store, kind)
    with atomic.replacing(path) as tmp:
        faiss.write_index(index, tmp)
    atomic.write_json(meta_path, meta)
    result.meta = meta
    log.info("built %s", result.describe())
    return result


# ---------------------------------------------------------------------------------------------- sharded IVF

#: An IVF index whose codes (rows x D x 2 bytes) would exceed this is built as HEALPix shards (GALAXALIGN_INDEX_SHARD_BYTES).
SHARD_BYTES = int(float(os.environ.get("GALAXALIGN_INDEX_SHARD_BYTES", 8 << 30)))
SHARD_MAP_ORDER = 10  # the sky map's order (3.4' pixels); shards are whole pixels of a coarser order


class ShardedIndex(ApproxIndex):
    """An IVF index cut into HEALPix shards sharing one trained quantizer: ``STORE.ivf.shard-NNNN.faiss`` (rows
    as ids). A search fans out (one shard at a time here, memory-mapped; or as tasks on an executor) and merges
    the shards' top-k (equal scores: the lower row)."""

    executor = None

    def shard_files(self) -> list[str]:
        base = os.path.dirname(self.path)
        return [os.path.join(base, s["file"]) for s in self.meta["shards"]]

    def search(self, queries, k, param=None):
        nprobe = int(param if param is not None else self.meta["param"])
        q = np.ascontiguousarray(queries, dtype=np.float32)
        items = [(f, q, k, nprobe) for f in self.shard_files()]
        if self.executor is not None:
            parts = [r for _, r in sorted(self.executor.imap_unordered(search_shard, items), key=lambda t: t[0])]
        else:
            parts = [search_shard(*it) for it in items]
        return merge_topk(parts, k)

    def set_param(self, value: int) -> None:
        self.meta["param"] = int(value)


def search_shard(path: str, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Task: the top-k of one shard (memory-mapped, so only the lists probed are paged in)."""
    import faiss

    index = faiss.read_index(path, faiss.IO_FLAG_MMAP)
    index.nprobe = int(nprobe)
    return index.search(queries, k)


def merge_topk(parts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (scores, rows) top-k lists per query: higher score first, equal scores lower row."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
    scores = np.where(rows < 0, -np.inf, scores)
    key_rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    out_s = np.empty((len(scores), k), np.float32)
    out_r = np.full((len(scores), k), -1, np.int64)
    for i in range(len(scores)):
        order = np.lexsort((key_rows[i], -scores[i]))[:k]
        out_s[i, :len(order)], out_r[i, :len(order)] = scores[i, order], rows[i, order]
    out_s[out_r < 0] = -np.inf
    return out_s, out_r


def fill_shard(store_path: str, trained: str, ranges: list, pixels: np.ndarray, shift: int, out: str) -> dict:
    """Task: add the store rows whose pixel (``healpix >> shift``) is in ``pixels`` to a copy of the trained
    empty index, reading only ``ranges``; written to ``out`` atomically."""
    import faiss

    from galaxalign_batch.downstream.distributed import process_bytes_read
    from galaxalign_batch.store import open_store

    r0 = process_bytes_read()
    store = open_store(store_path)
    index = faiss.read_index(trained)
    added = 0
    for a, b in ranges:
        hp = np.asarray(store.read("healpix", slice(a, b))) >> shift
        keep = np.flatnonzero(np.isin(hp, pixels))
        if not len(keep):
            continue
        x = np.ascontiguousarray(store.read_embeddings(slice(a, b))[keep], dtype=np.float32)
        index.add_with_ids(x, (a + keep).astype(np.int64))
        added += len(keep)
    with atomic.replacing(out) as tmp:
        faiss.write_index(index, tmp)
    return {"file": os.path.basename(out), "rows": added, "bytes_read": process_bytes_read() - r0}


def build_sharded_index(store: EmbeddingStore, *, shard_rows: int, nlist: int | None = None,
                        target_recall: float = 0.95, n_eval: int = 256, seed: int = 0, address: str | None = None,
                        threads: int | None = None) -> ShardedIndex:
    """An IVF index of the store in HEALPix shards of at most ``shard_rows`` rows (a dense pixel stays whole).

    One quantizer and fp16 scalar quantizer are trained on a sample (40 x nlist rows of whole chunks) by this
    process; each shard is filled by a task (Ray with ``address``, else threads) that reads only the chunks
    holding its pixels (the join's sky map); ``nprobe`` is tuned on ``n_eval`` rows against exact search as for
    the one-file index. Memory: this process the sample and one query batch; a task one shard's codes."""
    import faiss

    from galaxalign_batch.downstream.distributed import make_executor
    from galaxalign_batch.downstream.partitioned import _row_ranges, choose_order, map_rows
    from galaxalign_batch.store import schema

    t0 = time.perf_counter()
    n, d = store.n_rows, store.dim
    nlist = int(nlist or max(1, min(65536, round(4 * np.sqrt(n)))))
    nlist = min(nlist, n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    sample = _training_sample(store, min(n, max(40 * nlist, 10_000)), seed)
    index.train(sample)
    del sample
    path, meta_path = index_paths(store, "ivf")
    trained = path + ".trained"
    faiss.write_index(index, trained)
    chunk, shard = store.chunking
    shift = 2 * (schema.HEALPIX_ORDER - SHARD_MAP_ORDER)
    with make_executor(address, threads) as ex:
        step = max(shard, (1 << 20) // shard * shard)
        maps = [r for _, r in ex.imap_unordered(map_rows, [(store.path, a, min(a + step, n), shift)
                                                          for a in range(0, n, step)])]
        pix = np.concatenate([m["pix"] for m in maps])
        chunks = np.concatenate([m["chunk"] for m in maps])
        counts = np.concatenate([m["rows"] for m in maps])
        order = choose_order(pix, counts, SHARD_MAP_ORDER, shard_rows)
        coarse = pix >> (2 * (SHARD_MAP_ORDER - order))
        cpix, inv = np.unique(coarse, return_inverse=True)
        crows = np.bincount(inv, weights=counts)
        groups, cur, cur_rows = [], [], 0.0  # consecutive nested pixels (compact on the sky) up to shard_rows
        for p_, r_ in zip(cpix, crows):
            if cur and cur_rows + r_ > shard_rows:
                groups.append(cur)
                cur, cur_rows = [], 0.0
            cur.append(int(p_))
            cur_rows += r_
        if cur:
            groups.append(cur)
        items = []
        for i, g in enumerate(groups):
            chs = np.unique(chunks[np.isin(coarse, g)])
            items.append((store.path, trained, _row_ranges(chs, chunk, n), np.asarray(g, np.int64),
                          2 * (schema.HEALPIX_ORDER - order), f"{path[:-len('.faiss')]}.shard-{i:04d}.faiss"))
        filled = [None] * len(items)
        for i, r in ex.imap_unordered(fill_shard, items):
            filled[i] = r
    os.remove(trained)
    if sum(r["rows"] for r in filled) != n:
        raise RuntimeError(f"sharded index: {sum(r['rows'] for r in filled)} rows added, the store has {n}")
    build_seconds = time.perf_counter() - t0
    meta = {"format": FORMAT, "kind": "ivf", "rows": n, "dim": d, "model_id": (store.attrs.get("model") or {}).get("id"),
            "param_name": "nprobe", "settings": {"nlist": nlist, "shard_rows": shard_rows, "healpix_order": order},
            "shards": [{"file": r["file"], "rows": r["rows"], "pixels": g} for r, g in zip(filled, groups)],
            "target_recall": target_recall, "build_seconds": round(build_seconds, 2),
            "bytes_read": int(sum(r["bytes_read"] for r in filled)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result = ShardedIndex("ivf", None, dict(meta, param=1), path)
    params = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if p <= nlist] or [1]
    chosen, table, eval_rows = _tune(result, store, params, n_eval, target_recall, seed)
    meta.update(param=int(chosen), n_eval=int(len(eval_rows)), recall=table)
    atomic.write_json(meta_path, meta)  # written last: marks a complete index
    if os.path.exists(path):  # a one-file index of an earlier build
        os.remove(path)
    result.meta = meta
    log.info("built %s (%d shards)", result.describe(), len(groups))
    return result


def get_index(store: EmbeddingStore, kind: str, *, rebuild: bool = False, **build_kw) -> ApproxIndex:
    """The saved index of ``kind`` for ``store``, built (and saved) first when missing or stale."""
    if not rebuild:
        found = load_index(store, kind)
        if found is not None:
            return found
    return build_index(store, kind, **build_kw)
