"""Downstream at survey scale (issue 19): join, classify, index build and query against store and catalogue size,
on 1 and 2 Ray workers of a loopback cluster, and locally without Ray.

Synthetic stores of 10^5, 10^6 (10^7 with ``--sizes``) rows, D = 128 float16, made through
``EmbeddingStore.create`` (the store's own chunking: 16384 rows a chunk, 524288 a shard at D = 128) at
10^5 sources/deg^2 (Legacy-Survey-like: 3e9 sources over ~2e4 deg^2 is 1.5e5/deg^2), committed a
shard's worth of 0.25-degree bricks at a time; catalogues of 10^4-10^6 rows (70 % within ~0.3" of a stored
source, 30 % anywhere in the footprint; id, RAJ2000, DEJ2000, mag) as Parquet.

Each measurement runs in a child process; for the Ray configurations a fresh loopback cluster is
started per store size (``ray start --head --num-cpus 1`` [+ ``ray start --address ... --num-cpus 1``],
each ``--block`` in its own session, stopped by process group). Reported per run:

- ``seconds``: wall time of the call (Ray already up; the cluster start is not counted);
- ``driver_peak_mb``: VmHWM of the child (the driver);
- ``worker_peak_mb``: the largest VmHWM of the cluster's processes after the run (Ray workers are reused
  within one cluster, so this is the peak over this and earlier runs on that cluster);
- ``read_mb``: bytes read through read(2) (``rchar``) by the child and every cluster process during the
  run (page-cache hits included: the I/O the job asks for, not the disk's).

    python bench/scale.py [--sizes 1e5,1e6] [--catalogs 1e4,1e5,1e6] [--workers 0,1,2] [--parts join,classify,index,query]
                          [--data DIR] [--json OUT]

``--workers 0`` is the local run (no Ray, one thread). Figures and the extrapolation: bench/RESULTS.md,
"Downstream at survey scale".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np

from galaxalign_batch.downstream.distributed import process_bytes_read  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("TMPDIR", "/tmp")) / "galaxalign-bench-scale"
DENSITY = 1e5  # sources per deg^2
BRICK = 0.25
DIM = 128
RADIUS = 1.0
MODEL = {"id": "bench-scale", "name": "synthetic", "kind": "bench"}
ENV = dict(os.environ, GALAXALIGN_PROGRESS="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------- data

def make_store(path: Path, rows: int, seed: int = 0) -> None:
    from galaxalign_batch.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    per = int(DENSITY * BRICK * BRICK)  # 6250 rows a brick
    nbricks = -(-rows // per)
    side = int(np.ceil(np.sqrt(nbricks)))
    store = EmbeddingStore.create(path, DIM, attrs={"model": MODEL, "vocabulary": None, "cutout_spec": None},
                                  durable=False)
    _, shard = store.chunking
    batch, batch_rows, done = [], 0, 0
    for b in range(nbricks):
        m = min(per, rows - done)
        i, j = b % side, b // side
        name = f"b{i:03d}{j:03d}"
        ra = 150.0 + BRICK * (i + rng.random(m))
        dec = BRICK * (j + rng.random(m))
        x = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.normal(size=(m, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        batch.append((name, dict(embedding=x.astype(np.float16), object_id=np.array([f"10000/{name}/{k}" for k in range(m)]),
                                 ra=ra, dec=dec, tile=np.full(m, name), x=np.zeros(m, np.float32),
                                 y=np.zeros(m, np.float32), masked_fraction=np.zeros(m, np.float32)), ""))
        batch_rows += m
        done += m
        if batch_rows >= shard or done == rows:
            store.commit(batch)
            batch, batch_rows = [], 0
    store.finalize()


def make_catalog(store_path: Path, out: Path, rows: int, seed: int = 1) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from galaxalign_batch.store import open_store

    rng = np.random.default_rng(seed)
    s = open_store(store_path)
    near = int(0.7 * rows)
    pick = rng.choice(s.n_rows, near, replace=near > s.n_rows)
    sra, sdec = s.read("ra"), s.read("dec")
    ra, dec = sra[pick], sdec[pick]
    ra = ra + rng.normal(0, 0.3 / 3600, near) / np.cos(np.radians(dec))
    dec = dec + rng.normal(0, 0.3 / 3600, near)
    far = rows - near
    lo_ra, hi_ra, lo_dec, hi_dec = sra.min(), sra.max(), sdec.min(), sdec.max()
    ra = np.concatenate([ra, lo_ra + (hi_ra - lo_ra) * rng.random(far)])
    dec = np.concatenate([dec, lo_dec + (hi_dec - lo_dec) * rng.random(far)])
    order = rng.permutation(rows)
    pq.write_table(pa.table({"id": np.arange(rows), "RAJ2000": ra[order], "DEJ2000": dec[order],
                             "mag": rng.uniform(16, 23, rows).astype(np.float32)}), out, row_group_size=131072)


# ---------------------------------------------------------------------------------------------- measuring

def _status(pid: int | str, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class LoopbackCluster:
    """``ray start --head`` (+ ``ray start --address``) on 127.0.0.1, one CPU per node, stopped by process group."""

    def __init__(self, nodes: int):
        self.nodes = nodes
        self.procs: list[subprocess.Popen] = []
        self.address = None

    def __enter__(self):
        ray_bin = str(Path(sys.executable).parent / "ray")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")
        self.procs.append(subprocess.Popen(
            [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}", "--block"],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(3)
        for _ in range(self.nodes - 1):
            self.procs.append(subprocess.Popen(
                [ray_bin, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 "--disable-usage-stats", "--block"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        probe = (f"import ray,time\nray.init(address='{self.address}', log_to_driver=False)\n"
                 f"t=time.time()\nwhile sum(n['Alive'] for n in ray.nodes())<{self.nodes} and time.time()-t<120: "
                 "time.sleep(1)\nprint(sum(n['Alive'] for n in ray.nodes()))")
        for _ in range(60):
            r = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip().endswith(str(self.nodes)):
                return self
            time.sleep(2)
        self.__exit__()
        raise RuntimeError("the loopback cluster did not come up")

    def pids(self) -> list[int]:
        """The cluster's processes: the ``ray start`` processes and every descendant (Ray starts its workers in
        sessions of their own, so process groups do not find them)."""
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                    parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        roots = {p.pid for p in self.procs}
        out = []
        for pid in parent:
            q, seen = pid, 0
            while q > 1 and seen < 64:
                if q in roots:
                    out.append(pid)
                    break
                q, seen = parent.get(q, 0), seen + 1
        return out

    def rchar(self) -> int:
        return sum(process_bytes_read(p) for p in self.pids())

    def worker_peak_mb(self) -> float:
        peaks = []
        for p in self.pids():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"default_worker" in cmd or cmd.startswith(b"ray::"):
                peaks.append(_status(p, "VmHWM"))
        return max(peaks, default=0.0)

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def child(kind: str, store: str, arg: str, address: str) -> dict:
    from galaxalign_batch.store import open_store

    address = address or None
    r0 = process_bytes_read("self")
    t0 = time.perf_counter()
    if kind == "join":
        from galaxalign_batch.downstream.partitioned import join_partitioned

        rows = open_store(store).n_rows
        s = join_partitioned(store, arg, arg + ".out", radius=RADIUS, address=address, threads=1, force=True,
                             partition_rows=max(25_000, rows // 8))
        extra = {"matched": s.matched, "partitions": s.partitions, "order": s.order, "task_read_mb": s.bytes_read / 2**20}
    elif kind == "classify":
        from galaxalign_batch.downstream.classify import Scorer, classify_store, zero_shot_probs

        rng = np.random.default_rng(5)
        p = rng.normal(size=(10, DIM)).astype(np.float32)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        args = (p, 50.0, "auto")
        scorer = Scorer(MODEL, "text", [f"c{i}" for i in range(10)], [f"c{i}" for i in range(10)],
                        lambda st, a, b: zero_shot_probs(a, b, st.path, *args), task=lambda: (zero_shot_probs, args))
        s = classify_store(store, scorer, force=True, address=address)
        extra = {"rows": s.rows}
    elif kind == "index":
        from galaxalign_batch.downstream.index import build_index
        from galaxalign_batch.store import open_store as _open

        st = _open(store)
        idx = build_index(st, "ivf", shard_rows=max(25_000, st.n_rows // 4), address=address)
        rec = idx.meta["recall"][str(idx.meta["param"])]
        extra = {"shards": len(idx.meta["shards"]), "nprobe": idx.meta["param"], "recall@10": rec.get("10"),
                 "nlist": idx.meta["settings"]["nlist"], "task_read_mb": idx.meta["bytes_read"] / 2**20}
    elif kind == "query":
        import torch

        from galaxalign_batch import ops
        from galaxalign_batch.downstream.distributed import make_executor
        from galaxalign_batch.downstream.index import load_index
        from galaxalign_batch.store import open_store as _open

        st = _open(store)
        idx = load_index(st, "ivf")
        q = np.ascontiguousarray(st.read("embedding", np.sort(np.random.default_rng(9).choice(st.n_rows, 100,
                                                                                               replace=False))),
                                 dtype=np.float32)
        ex = make_executor(address) if address else None
        idx.executor = ex
        t1 = time.perf_counter()
        idx.search(q, 10)
        ivf_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        ops.similarity_topk(torch.from_numpy(q), st.embeddings, 10, chunk_rows=st.chunking[1])
        exact_s = time.perf_counter() - t1
        extra = {"queries": 100, "ivf_seconds": ivf_s, "exact_seconds": exact_s, "shards": len(idx.meta["shards"])}
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - t0, "driver_peak_mb": _status("self", "VmHWM"),
            "driver_read_mb": (process_bytes_read("self") - r0) / 2**20, **extra}


class Sampler:
    """Samples the cluster's processes every 0.2 s: their last ``rchar`` (Ray ends idle workers within seconds, so
    a process's reads are counted from its last sample) and the largest VmHWM of a worker."""

    def __init__(self, cluster: LoopbackCluster):
        import threading

        self.cluster = cluster
        self.first: dict[int, int] = {p: process_bytes_read(p) for p in cluster.pids()}
        self.last: dict[int, int] = dict(self.first)
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(0.2)

    def _sample(self):
        for p in self.cluster.pids():
            r = process_bytes_read(p)
            if r:
                self.last[p] = r
                self.first.setdefault(p, 0)
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"default_worker" in cmd or cmd.startswith(b"ray::"):
                self.peak = max(self.peak, _status(p, "VmHWM"))

    def finish(self) -> tuple[float, float]:
        self.stop.set()
        self.thread.join()
        self._sample()
        return sum(self.last[p] - self.first[p] for p in self.last) / 2**20, self.peak


def run_child(kind: str, store: Path, arg: str, cluster: LoopbackCluster | None) -> dict:
    sampler = Sampler(cluster) if cluster else None
    p = subprocess.run([sys.executable, __file__, "--child", kind, str(store), arg, cluster.address if cluster else ""],
                       capture_output=True, text=True, env=ENV)
    cluster_mb, worker_peak = sampler.finish() if sampler else (0.0, None)
    if p.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["read_mb"] = out["driver_read_mb"] + cluster_mb
    out["worker_peak_mb"] = worker_peak
    return out


def fit(xs, ys) -> dict:
    """Least squares ``y = a + b x`` and the power ``y ~ x^k`` between the smallest and largest x."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(xs, ys, 1)
    k = float(np.log(ys[-1] / ys[0]) / np.log(xs[-1] / xs[0])) if len(xs) > 1 and ys[0] > 0 else float("nan")
    return {"intercept": float(a), "per_unit": float(b), "exponent": k}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--catalogs", default="1e4,1e5,1e6")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--parts", default="join,classify,index,query")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "STORE", "ARG", "ADDRESS"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    cats = [int(float(s)) for s in args.catalogs.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    parts = args.parts.split(",")
    args.data.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    results = {"machine": cpu_model(), "cores": os.cpu_count(), "load_before": load, "runs": []}
    print(f"# {cpu_model()}, {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    for n in sizes:
        store = args.data / f"store-{n:.0e}.zarr"
        if not (store / "zarr.json").exists():
            t0 = time.perf_counter()
            make_store(store, n)
            print(f"made {store} in {time.perf_counter() - t0:.0f} s", flush=True)
        for m in cats:
            cat = args.data / f"cat-{n:.0e}-{m:.0e}.parquet"
            if not cat.exists():
                make_catalog(store, cat, m)
        for w in workers:
            cluster = LoopbackCluster(w) if w else None
            if cluster:
                cluster.__enter__()
            try:
                for m in (cats if "join" in parts else []):
                    cat = args.data / f"cat-{n:.0e}-{m:.0e}.parquet"
                    r = run_child("join", store, str(cat), cluster)
                    r.update(op="join", rows=n, catalog=m, workers=w)
                    results["runs"].append(r)
                    print(json.dumps(r), flush=True)
                for op in ("index", "query"):
                    if op in parts:
                        r = run_child(op, store, "-", cluster)
                        r.update(op=op, rows=n, workers=w)
                        results["runs"].append(r)
                        print(json.dumps(r), flush=True)
                if "classify" in parts:
                    r = run_child("classify", store, "-", cluster)
                    r.update(op="classify", rows=n, workers=w)
                    results["runs"].append(r)
                    print(json.dumps(r), flush=True)
            finally:
                if cluster:
                    cluster.__exit__()
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
