"""Benchmark `embed` end to end: simulated compressed bricks -> Zarr store, with the tiny model.

Engine: ``galaxalign_batch.engine.embed_tiles`` on a local Ray instance with 1 and 2 CPUs (Ray's
start-up is reported separately, not timed: a cluster is started once per job). Baseline, same
sources, same model, one process: fitsio reads, astropy ``Cutout2D`` per source and band, the
NumPy viewer stretch and ``skimage.transform.resize`` per source (bench/preprocess.py's baseline),
then open_clip encoding one galaxy at a time, and a Zarr write at the end.

    python bench/embed.py [--json PATH] [--bricks N] [--size PX] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from preprocess import baseline_brick, cpu_model, make_data  # noqa: E402  (bench/preprocess.py)

DEFAULT_DATA = Path(os.environ.get("TMPDIR", "/tmp")) / "galaxalign-bench-embed"


def baseline(root: Path, bricks: list[str], enc, out: Path) -> dict:
    """Sequential: read + cut (bench/preprocess.py's baseline), encode one by one, write once."""
    import torch
    import zarr

    t = {"read+preprocess": 0.0, "model": 0.0, "write": 0.0}
    embs, n = [], 0
    for b in bricks:
        t0 = time.perf_counter()
        r = baseline_brick(root, b, enc.spec)
        t1 = time.perf_counter()
        with torch.inference_mode():
            for px in r["pixels"]:
                embs.append(enc.encode(px[None], batch_size=1))
        t2 = time.perf_counter()
        t["read+preprocess"] += t1 - t0
        t["model"] += t2 - t1
        n += r["n"]
    t0 = time.perf_counter()
    g = zarr.open_group(out, mode="w")
    g.create_array("embedding", data=np.concatenate(embs).astype(np.float16))
    t["write"] = time.perf_counter() - t0
    return {"sources": n, "seconds": sum(t.values()), "timings": t}


def engine_work(root: Path, enc) -> dict:
    """The engine's own work per source, done sequentially on one core: its read + cut path
    (`prepare_tile`) and the model at the engine's CPU batch (64). Divided by the cores, this is the
    fastest any schedule of that work can go: the ceiling the engine is measured against."""
    import torch

    from galaxalign_batch.engine import resolve_tiles
    from galaxalign_batch.engine.prepare import prepare_tile

    t = {"read": 0.0, "preprocess": 0.0, "model": 0.0}
    n = 0
    for ref in resolve_tiles([str(root)]):
        p = prepare_tile(ref, enc.spec)
        t["read"] += p.timings["read"]
        t["preprocess"] += p.timings["preprocess"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            enc.encode(p.pixels, batch_size=64)
        t["model"] += time.perf_counter() - t0
        n += p.n
    return {"sources": n, "seconds": sum(t.values()), "timings": t,
            "ms_per_source": {k: 1e3 * v / max(n, 1) for k, v in t.items()}}


def engine(root: Path, cpus: int, out: Path) -> dict:
    import ray

    from galaxalign_batch.engine import embed_tiles, resolve_tiles

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    try:
        s = embed_tiles(resolve_tiles([str(root)]), "tiny", out)
    finally:
        ray.shutdown()
    assert s.ok, s.lines()
    return {"sources": s.sources, "seconds": s.seconds, "ray_startup_s": startup, "model_startup_s": s.startup_seconds,
            "steady_sources_per_s": s.sources / (s.seconds - s.startup_seconds), "timings": s.timings}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--bricks", type=int, default=4)
    ap.add_argument("--size", type=int, default=2400, help="brick side in px (3600 = full brick)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("GALAXALIGN_PROGRESS", "0")

    from galaxalign_batch.engine.encoder import load_encoder
    from galaxalign_batch.survey import layout

    import logging
    logging.getLogger("galaxalign_batch.engine.encoder").setLevel(logging.ERROR)
    source = make_data(args.data, args.bricks, args.size, args.seed, None)
    bricks = layout.list_bricks(args.data)
    work = Path(tempfile.mkdtemp(prefix="galaxalign-bench-embed-"))
    try:
        import torch

        torch.set_num_threads(1)
        enc = load_encoder("tiny")
        base = baseline(args.data, bricks, enc, work / "baseline.zarr")
        own = engine_work(args.data, enc)
        runs = {f"engine_{c}cpu": engine(args.data, c, work / f"engine{c}.zarr") for c in (1, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = lambda r: r["sources"] / r["seconds"]  # noqa: E731
    print(f"data: {source}; {len(bricks)} bricks; CPU: {cpu_model()} x {os.cpu_count()}")
    print(f"{'path':<16}{'sources':>9}{'seconds':>9}{'sources/s':>11}{'vs baseline':>13}  time split (s)")
    for name, r in [("baseline", base), *runs.items()]:
        split = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        print(f"{name:<16}{r['sources']:>9}{r['seconds']:>9.1f}{rate(r):>11.1f}{rate(r) / rate(base):>12.1f}x  {split}")
    ms = own["ms_per_source"]
    print(f"engine work per source on one core (sequential): read {ms['read']:.2f} ms, preprocess "
          f"{ms['preprocess']:.2f} ms, model {ms['model']:.2f} ms (batch 64); baseline: "
          f"{1e3 * base['seconds'] / base['sources']:.2f} ms")
    for c in (1, 2):
        ceiling = base["seconds"] / (own["seconds"] / c)
        print(f"ceiling with {c} core(s), no start-up, perfect overlap: {ceiling:.1f}x baseline")
    for name, r in runs.items():
        print(f"{name}: Ray start-up {r['ray_startup_s']:.1f} s (not timed); model replicas ready after "
              f"{r['model_startup_s']:.1f} s (timed); after that {r['steady_sources_per_s']:.1f} sources/s "
              f"({r['steady_sources_per_s'] / rate(base):.1f}x baseline); task times are summed over workers")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": source, "cpu": cpu_model(), "cores": os.cpu_count(),
                                               "baseline": base, "engine_work_sequential": own, **runs},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
