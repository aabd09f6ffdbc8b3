"""Benchmark the downstream commands on a synthetic 10^6-row store.

- **join**: ``galaxalign_batch.downstream.join_catalog`` (HEALPix-partitioned, streamed cross-match,
  Parquet out) of a 10^5-row catalog vs astropy ``SkyCoord.match_to_catalog_sky`` on the full
  arrays, each in its own subprocess (peak RSS from ``getrusage``; the RSS after imports is given
  too); the matched rows of both are compared.
- **search**: exact top-k (``ops.similarity_topk`` streaming the Zarr ``embedding`` array) vs the
  faiss indexes of ``downstream.index`` (IVF, HNSW): build time, query time, recall@10 on queries
  not used to tune the index.
- **classify**: ``classify_store`` with 10 random prototypes (the fused prototype kernel), rows/s.

The store (clustered unit embeddings, D = 128, float16; 10^5 sources/deg² over 10 deg², committed
brick by brick like ``embed``) and the catalog (70 % within ~0.3" of a stored source, 30 % random)
are made once under ``--data`` and reused.

    python bench/downstream.py [--json PATH] [--rows 1000000] [--catalog-rows 100000] [--dim 128] [--no-hnsw]
                               [--parts join,classify,search]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np

DEFAULT_DATA = Path(os.environ.get("TMPDIR", "/tmp")) / "galaxalign-bench-downstream"
RA0, DEC0, WIDTH, HEIGHT, BRICK = 150.0, 0.0, 4.0, 2.5, 0.25
RADIUS = 1.0  # arcsec
MODEL = {"id": "bench-synthetic", "name": "synthetic", "kind": "bench"}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike getrusage's ru_maxrss it does not inherit the parent's peak)."""
    return _status_mb("VmHWM")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def _heavy_imports() -> None:
    """What the matching imports lazily: imported before timing, like astropy for the baseline."""
    import astropy.units  # noqa: F401
    import astropy_healpix  # noqa: F401
    import dask  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import scipy.spatial  # noqa: F401
    import zarr  # noqa: F401


# ---------------------------------------------------------------------------------------------- data

def make_store(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    from galaxalign_batch.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    nx, ny = int(WIDTH / BRICK), int(HEIGHT / BRICK)
    per = -(-rows // (nx * ny))
    store = EmbeddingStore.create(path, dim, attrs={"model": MODEL, "vocabulary": None, "cutout_spec": None})
    done = 0
    for j in range(ny):
        for i in range(nx):
            m = min(per, rows - done)
            if m <= 0:
                break
            name = f"b{i:02d}{j:02d}"
            ra = RA0 + BRICK * (i + rng.random(m))
            dec = DEC0 + BRICK * (j + rng.random(m))
            x = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store.commit([(name, dict(embedding=x, object_id=np.array([f"10000/{name}/{k}" for k in range(m)]),
                                      ra=ra, dec=dec, tile=np.full(m, name), x=np.zeros(m, np.float32),
                                      y=np.zeros(m, np.float32), masked_fraction=np.zeros(m, np.float32)), "")])
            done += m
    store.finalize()


def make_catalog(store_path: Path, out: Path, rows: int, seed: int = 1) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from galaxalign_batch.store import open_store

    rng = np.random.default_rng(seed)
    s = open_store(store_path)
    near = int(0.7 * rows)
    pick = rng.choice(s.n_rows, near, replace=False)
    ra, dec = s.read("ra")[pick], s.read("dec")[pick]
    ra = ra + rng.normal(0, 0.3 / 3600, near) / np.cos(np.radians(dec))
    dec = dec + rng.normal(0, 0.3 / 3600, near)
    far = rows - near
    ra = np.concatenate([ra, RA0 + WIDTH * rng.random(far)])
    dec = np.concatenate([dec, DEC0 + HEIGHT * rng.random(far)])
    order = rng.permutation(rows)
    pq.write_table(pa.table({"id": np.arange(rows), "RAJ2000": ra[order], "DEJ2000": dec[order],
                             "mag": rng.uniform(16, 23, rows).astype(np.float32)}), out)


# ---------------------------------------------------------------------------------------------- children

def child_join(store: str, catalog: str, out: str, rows_out: str) -> dict:
    import pyarrow.parquet as pq

    from galaxalign_batch.downstream.join import join_catalog

    _heavy_imports()
    base = current_rss_mb()
    t0 = time.perf_counter()
    summary = join_catalog(store, catalog, out, radius=RADIUS)
    seconds = time.perf_counter() - t0
    rows = pq.read_table(out, columns=["store_row"]).column("store_row").to_pandas().fillna(-1).to_numpy(np.int64)
    np.save(rows_out, rows)
    return {"seconds": seconds, "matched": summary.matched, "rss_after_imports_mb": base, "peak_rss_mb": rss_mb()}


def child_match(store: str, catalog: str) -> dict:
    """Only the matching of `join` (no catalog columns, no Parquet output), for the like-for-like figure."""
    import pyarrow.parquet as pq

    from galaxalign_batch.downstream.join import match_positions
    from galaxalign_batch.store import open_store

    _heavy_imports()
    base = current_rss_mb()
    t0 = time.perf_counter()
    t = pq.read_table(catalog, columns=["RAJ2000", "DEJ2000"])
    rows, _ = match_positions(open_store(store), t.column(0).to_numpy(), t.column(1).to_numpy(), RADIUS)
    return {"seconds": time.perf_counter() - t0, "matched": int((rows >= 0).sum()), "rss_after_imports_mb": base,
            "peak_rss_mb": rss_mb()}


def child_astropy(store: str, catalog: str, rows_out: str) -> dict:
    import astropy.units as u
    import pyarrow.parquet as pq
    import zarr
    from astropy.coordinates import SkyCoord

    base = current_rss_mb()
    t0 = time.perf_counter()
    g = zarr.open_group(store, mode="r")
    n = int(g.attrs["rows_committed"])
    sra, sdec = g["ra"][:n], g["dec"][:n]
    t = pq.read_table(catalog, columns=["RAJ2000", "DEJ2000"])
    t1 = time.perf_counter()
    cat = SkyCoord(t.column(0).to_numpy() * u.deg, t.column(1).to_numpy() * u.deg)
    idx, sep, _ = cat.match_to_catalog_sky(SkyCoord(sra * u.deg, sdec * u.deg))
    rows = np.where(sep.arcsec <= RADIUS, idx, -1).astype(np.int64)
    t2 = time.perf_counter()
    np.save(rows_out, rows)
    return {"seconds": t2 - t0, "match_seconds": t2 - t1, "matched": int((rows >= 0).sum()),
            "rss_after_imports_mb": base, "peak_rss_mb": rss_mb()}


def run_child(kind: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- in process

def bench_search(store_path: Path, hnsw: bool, n_queries: int = 200, k: int = 10) -> dict:
    import torch

    from galaxalign_batch import ops
    from galaxalign_batch.downstream.index import build_index, recall_at
    from galaxalign_batch.store import open_store

    store = open_store(store_path)
    rng = np.random.default_rng(7)  # not the rows the index build tunes on (seed 1)
    qrows = np.sort(rng.choice(store.n_rows, n_queries, replace=False))
    queries = store.read("embedding", qrows).astype(np.float32)
    _, shard = store.chunking
    out: dict = {"queries": n_queries, "k": k}
    t0 = time.perf_counter()
    s1, i1 = ops.similarity_topk(torch.from_numpy(queries[:1]), store.embeddings, k, chunk_rows=shard)
    out["exact_1_query_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, exact = ops.similarity_topk(torch.from_numpy(queries), store.embeddings, k, chunk_rows=shard)
    out["exact_batch_s"] = time.perf_counter() - t0
    exact = exact.numpy()
    out["exact_self_first"] = float(np.mean(exact[:, 0] == qrows))
    for kind in (["ivf", "hnsw"] if hnsw else ["ivf"]):
        for f in (f"{store_path}.{kind}.faiss", f"{store_path}.{kind}.json"):
            if os.path.exists(f):
                os.remove(f)
        t0 = time.perf_counter()
        idx = build_index(store, kind)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, one = idx.search(queries[:1], k)
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, approx = idx.search(queries, k)
        batch = time.perf_counter() - t0
        out[kind] = {"build_s": build, "param": idx.meta["param_name"] + "=" + str(idx.meta["param"]),
                     "settings": idx.meta["settings"], "tuning_recall@10": idx.meta["recall"][str(idx.meta["param"])]["10"],
                     "recall@10": recall_at(approx, exact, k), "self_first": float(np.mean(approx[:, 0] == qrows)),
                     "one_query_s": single, "batch_s": batch,
                     "index_file_mb": os.path.getsize(f"{store_path}.{kind}.faiss") / 2 ** 20}
    return out


def bench_classify(store_path: Path, work: Path) -> dict:
    import torch

    from galaxalign_batch import ops
    from galaxalign_batch.downstream.classify import Scorer, classify_store

    path = work / "classified.zarr"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(store_path, path)
    from galaxalign_batch.store import open_store

    dim = open_store(path).dim
    protos = torch.nn.functional.normalize(torch.randn(10, dim, generator=torch.Generator().manual_seed(0)), dim=-1)

    def score(st, a, b):
        return ops.prototype_probs(torch.from_numpy(st.group["embedding"][a:b]), protos, 50.0).numpy()

    t0 = time.perf_counter()
    summary = classify_store(path, Scorer(MODEL, "combined", [f"c{i}" for i in range(10)], [f"c{i}" for i in range(10)],
                                          score))
    seconds = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    return {"rows": summary.rows, "seconds": seconds, "rows_per_s": summary.rows / seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--catalog-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="where the store and catalog are made (reused)")
    ap.add_argument("--no-hnsw", action="store_true", help="skip the HNSW index (slow to build on few cores)")
    ap.add_argument("--repeat", type=int, default=3, help="join comparison runs (median reported; default 3)")
    ap.add_argument("--parts", default="join,classify,search", help="which benchmarks to run (default: all three)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("GALAXALIGN_PROGRESS", "0")
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        fn = {"join": child_join, "match": child_match, "astropy": child_astropy}[kind]
        print(json.dumps(fn(*rest)))
        return 0

    data = Path(args.data) / f"n{args.rows}-d{args.dim}"
    store = data / "store.zarr"
    catalog = data / f"catalog-{args.catalog_rows}.parquet"
    made = {}
    if not (store / "zarr.json").exists():
        shutil.rmtree(store, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_store(store, args.rows, args.dim)
        made["store_s"] = time.perf_counter() - t0
    if not catalog.exists():
        make_catalog(store, catalog, args.catalog_rows)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=data) as work:
        work = Path(work)
        res: dict = {"rows": args.rows, "catalog_rows": args.catalog_rows, "dim": args.dim, "radius_arcsec": RADIUS,
                     "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": load, "made": made}
        parts = set(args.parts.split(","))
        if "join" in parts:
            runs: dict[str, list[dict]] = {"join": [], "match_only": [], "astropy": []}
            for _ in range(args.repeat):  # interleaved, so that a busy spell hits all three alike
                runs["join"].append(run_child("join", str(store), str(catalog), str(work / "out.parquet"),
                                              str(work / "ours.npy")))
                runs["match_only"].append(run_child("match", str(store), str(catalog)))
                runs["astropy"].append(run_child("astropy", str(store), str(catalog), str(work / "astropy.npy")))
            for name, rs in runs.items():  # the run with the median time, plus every time
                res[name] = dict(sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2],
                                 all_seconds=[r["seconds"] for r in rs],
                                 max_peak_rss_mb=max(r["peak_rss_mb"] for r in rs))
            ours, theirs = np.load(work / "ours.npy"), np.load(work / "astropy.npy")
            res["join_agrees_with_astropy"] = float(np.mean(ours == theirs))
        if "classify" in parts:
            res["classify"] = bench_classify(store, work)
        if "search" in parts:
            res["search"] = bench_search(store, hnsw=not args.no_hnsw)
    res["loadavg_end"] = os.getloadavg()
    if "join" in res:
        j, a, m = res["join"], res["astropy"], res["match_only"]
        print(f"join {args.catalog_rows} x {args.rows}: ours {j['seconds']:.2f} s (peak RSS {j['peak_rss_mb']:.0f} MB), "
              f"match only {m['seconds']:.2f} s ({m['peak_rss_mb']:.0f} MB); astropy {a['seconds']:.2f} s "
              f"(match {a['match_seconds']:.2f} s, peak RSS {a['peak_rss_mb']:.0f} MB); same rows: "
              f"{100 * res['join_agrees_with_astropy']:.3f}%")
    if "classify" in res:
        print(f"classify: {res['classify']['rows_per_s']:.0f} rows/s")
    s = res.get("search", {})
    if s:
        print(f"exact: 1 query {s['exact_1_query_s']:.2f} s, {s['queries']} queries {s['exact_batch_s']:.2f} s")
    for kind in ("ivf", "hnsw"):
        if kind in s:
            x = s[kind]
            print(f"{kind}: build {x['build_s']:.1f} s ({x['param']}), recall@10 {x['recall@10']:.3f}, 1 query "
                  f"{1000 * x['one_query_s']:.2f} ms, {s['queries']} queries {x['batch_s']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
