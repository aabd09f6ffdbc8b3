"""Benchmark `embed` end to end: simulated compressed bricks -> Zarr store, with the tiny model.

DataLoader: what a peer tool does (Zoobot's catalogue prediction): a torch DataLoader whose worker
processes (one per core) read and cut the same bricks with the project's reader and cutouts, batching
the sources (64) into the same model in the main process (torch's default threads).
Ceilings, measured in the same run: the model alone on every core (1 thread each, batch 64, cutouts
already made), and all of the engine's work (read + cut + model) on every core.

Engine: ``galaxalign_batch.engine.embed_tiles`` on a local Ray instance with 1 and 2 CPUs (Ray's
start-up is reported separately, not timed: a cluster is started once per job). Baseline, same
sources, same model, one process: fitsio reads, astropy ``Cutout2D`` per source and band, the
NumPy viewer stretch and ``skimage.transform.resize`` per source (bench/preprocess.py's baseline),
then open_clip encoding one galaxy at a time, and a Zarr write at the end.

    python bench/embed.py [--json PATH] [--bricks N] [--size PX] [--data DIR]
    python bench/embed.py --device cuda [--model ViT-B-16] [--sources 30000] [--batch 512] [--json PATH]

``--device cuda`` measures the engine's GPU stage alone: an open_clip model at random weights
(ViT-B-16 by default) encoding uint8 cutouts at the model's input size, as the engine's encoder
replica receives them, (a) a baseline: each batch converted to float on the host, copied, encoded in fp32 (the
engine's encode before it was tuned for GPUs), (b) ``Encoder.encode`` as the engine calls it (uint8
batches copied from pinned memory on a side stream while the previous batch runs, bf16 autocast),
(c) the same in fp32, (d) the model alone on a resident batch (the ceiling). Sources/s and GPU utilisation sampled through NVML every 20 ms (mean over the timed part).
Reads and cutouts are CPU work, measured by the default mode.
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
import torch

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

    from galaxalign_batch.survey.tiles import resolve_tiles
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


class BrickSources(torch.utils.data.IterableDataset):
    """What a peer tool's catalogue prediction does (Zoobot's ``predict_on_catalog``: a torch Dataset of
    galaxies, DataLoader worker processes load and transform them, the main process batches them into the
    model): an IterableDataset over the bricks, each worker reading and cutting its share of bricks with
    the project's own reader and Numba cutouts (`prepare_tile`, the engine's task) and yielding one
    cutout per source; the DataLoader collates batches of 64 and the main process runs the model."""

    def __init__(self, refs, spec):
        self.refs, self.spec = list(refs), spec

    def __iter__(self):
        from galaxalign_batch.engine.prepare import prepare_tile

        info = torch.utils.data.get_worker_info()
        mine = self.refs[info.id::info.num_workers] if info is not None else self.refs
        for ref in mine:
            p = prepare_tile(ref, self.spec)
            for i in range(p.n):
                yield torch.from_numpy(np.ascontiguousarray(p.pixels[i]))


def _one_thread_worker(_):
    """A loader worker cuts on one thread (Numba, torch), as an engine tile task does."""
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)


def dataloader(root: Path, enc, workers: int, out: Path, batch: int = 64) -> dict:
    """The DataLoader pipeline (see :class:`BrickSources`): ``workers`` loader processes, the model in the
    main process on torch's default threads (one per core), one Zarr write at the end. ``seconds`` from
    creating the loader to the write; ``steady`` from the first batch."""
    import torch
    import zarr

    from galaxalign_batch.survey.tiles import resolve_tiles

    torch.set_num_threads(os.cpu_count() or 1)
    refs = resolve_tiles([str(root)])
    t0 = time.perf_counter()
    # spawn: Numba's OpenMP layer in this process makes fork() unsafe (GNU OpenMP terminates the child)
    loader = torch.utils.data.DataLoader(BrickSources(refs, enc.spec), batch_size=batch, num_workers=workers,
                                         prefetch_factor=4, multiprocessing_context="spawn",
                                         worker_init_fn=_one_thread_worker)
    embs, n, t_first, model_s = [], 0, None, 0.0
    for x in loader:
        t_first = t_first or time.perf_counter()
        t1 = time.perf_counter()
        embs.append(enc.encode(x.numpy(), batch_size=batch))
        model_s += time.perf_counter() - t1
        n += len(x)
    g = zarr.open_group(out, mode="w")
    g.create_array("embedding", data=np.concatenate(embs).astype(np.float16))
    t_end = time.perf_counter()
    torch.set_num_threads(1)
    return {"sources": n, "seconds": t_end - t0, "first_batch_s": t_first - t0,
            "steady_sources_per_s": n / (t_end - t_first), "timings": {"model (main process)": model_s},
            "workers": workers}


def engine(root: Path, cpus: int, out: Path, precision: str = "auto") -> dict:
    import ray

    from galaxalign_batch.cluster import init_ray
    from galaxalign_batch.engine import embed_tiles
    from galaxalign_batch.survey.tiles import resolve_tiles

    t0 = time.perf_counter()
    init_ray(num_cpus=cpus, log_to_driver=False)  # as `embed` starts it (its workers at the driver's priority)
    startup = time.perf_counter() - t0
    try:
        s = embed_tiles(resolve_tiles([str(root)]), "tiny", out, precision=precision)
    finally:
        ray.shutdown()
    assert s.ok, s.lines()
    return {"sources": s.sources, "seconds": s.seconds, "ray_startup_s": startup, "model_startup_s": s.startup_seconds,
            "steady_sources_per_s": s.sources / (s.seconds - s.startup_seconds), "timings": s.timings}


class _NvmlSampler:
    """GPU utilisation (%) sampled through NVML on a thread; ``mean`` over the samples taken while running."""

    def __init__(self, index: int = 0, period: float = 0.02):
        import threading

        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._period = period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self._period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def gpu_encoder(model: str, device: str = "cuda"):
    """The engine's encoder (``Encoder``) of the open_clip model ``model`` at random weights (which `embed`
    refuses; speed needs no weights), in the precision `embed --precision auto` picks on ``device``."""
    from galaxalign_batch.engine.encoder import _from_open_clip
    from galaxalign_batch.model.precision import resolve_precision
    from galaxalign_batch.model.spec import parse_model_spec

    enc = _from_open_clip(parse_model_spec(model), device)
    enc.precision = resolve_precision("auto", device)
    return enc


def gpu_main(args) -> int:
    import torch

    dev = torch.device("cuda")
    enc = gpu_encoder(args.model, "cuda")
    size = enc.spec.out_size
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(args.batch * 4, 3, size, size), dtype=np.uint8)  # cutouts as the engine makes them
    n_batches = max(4, args.sources // args.batch // 4 * 4)
    batches = [pool[(i % 4) * args.batch:(i % 4 + 1) * args.batch] for i in range(n_batches)]
    results = {}

    def timed(name: str, fn) -> None:
        fn(batches[:2])  # warm-up: cuDNN/cuBLAS choices, allocator
        torch.cuda.synchronize()
        with _NvmlSampler() as nv:
            t0 = time.perf_counter()
            fn(batches)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        results[name] = {"sources": n_batches * args.batch, "seconds": dt, "sources_per_s": n_batches * args.batch / dt,
                         "gpu_util_mean_pct": nv.mean, "nvml_samples": len(nv.samples)}
        print(f"{name:<34} {results[name]['sources_per_s']:10.0f} sources/s   GPU busy {nv.mean:5.1f}% "
              f"({len(nv.samples)} NVML samples)", flush=True)

    def engine_encode(bs):  # what the engine's replica does: Encoder.encode on a tile's sources (the 4-batch pool)
        for _ in range(0, len(bs), 4):
            enc.encode(pool, batch_size=args.batch)

    def float_transfer_fp32(bs):  # the engine's encode before pinned uint8 transfers and bf16 (the baseline)
        with torch.no_grad():
            for b in bs:
                x = torch.from_numpy(b).float() / 255.0
                enc._encode(x.to(dev)).float().cpu().numpy()

    print(f"device: {torch.cuda.get_device_name()}; model {args.model} (random weights), input {size} px, "
          f"batch {args.batch}, {n_batches * args.batch} sources; CPU: {cpu_model()} x {os.cpu_count()}", flush=True)
    timed("baseline: float transfer, fp32", float_transfer_fp32)
    timed(f"Encoder.encode (uint8 pinned, {enc.precision})", engine_encode)
    chosen, enc.precision = enc.precision, "fp32"
    timed("Encoder.encode (uint8 pinned, fp32)", engine_encode)
    enc.precision = chosen
    # the model alone on resident data: the ceiling for this batch size
    x = torch.from_numpy(pool[:args.batch]).to(dev)

    def model_only(bs):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in bs:
                enc._encode(x.float().div_(255.0))

    timed("model only, resident input, bf16", model_only)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": args.model,
                                               "batch": args.batch, "cpu": cpu_model(), "results": results}, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--bricks", type=int, default=4)
    ap.add_argument("--size", type=int, default=2400, help="brick side in px (3600 = full brick)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-cpus", default=None, metavar="N,M",
                    help="Ray CPUs of the engine runs (default: 1 and all cores; all cores is always run)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="CPU: what every path's model runs in (embed --precision; auto: bf16 on a CPU with "
                         "AVX512-BF16, else fp32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU encoder stage (see above)")
    ap.add_argument("--model", default="ViT-B-16", help="--device cuda: open_clip model name (random weights)")
    ap.add_argument("--sources", type=int, default=30000, help="--device cuda: sources to encode")
    ap.add_argument("--batch", type=int, default=512, help="--device cuda: batch size")
    args = ap.parse_args(argv)
    os.environ.setdefault("GALAXALIGN_PROGRESS", "0")
    if args.device == "cuda":
        return gpu_main(args)

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
        enc = load_encoder("tiny", precision=args.precision)
        base = baseline(args.data, bricks, enc, work / "baseline.zarr")
        own = engine_work(args.data, enc)
        cores = os.cpu_count() or 1
        loader = dataloader(args.data, enc, cores, work / "dataloader.zarr")
        cpus = sorted({int(c) for c in args.engine_cpus.split(",")} | {cores}) if args.engine_cpus else sorted({1, cores})
        runs = {f"engine_{c}cpu": engine(args.data, c, work / f"engine{c}.zarr", args.precision) for c in cpus}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = lambda r: r["sources"] / r["seconds"]  # noqa: E731
    print(f"data: {source}; {len(bricks)} bricks; CPU: {cpu_model()} x {os.cpu_count()}; model precision "
          f"{enc.precision} (--precision {args.precision})")
    print(f"{'path':<16}{'sources':>9}{'seconds':>9}{'sources/s':>11}{'vs baseline':>13}  time split (s)")
    for name, r in [("baseline", base), ("dataloader", loader), *runs.items()]:
        split = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        print(f"{name:<16}{r['sources']:>9}{r['seconds']:>9.1f}{rate(r):>11.1f}{rate(r) / rate(base):>12.1f}x  {split}")
    ms = own["ms_per_source"]
    print(f"engine work per source on one core (sequential): read {ms['read']:.2f} ms, preprocess "
          f"{ms['preprocess']:.2f} ms, model {ms['model']:.2f} ms (batch 64); baseline: "
          f"{1e3 * base['seconds'] / base['sources']:.2f} ms")
    for c in cpus:
        ceiling = base["seconds"] / (own["seconds"] / c)
        print(f"ceiling with {c} core(s), no start-up, perfect overlap: {ceiling:.1f}x baseline")
    model_ceiling = cores * 1e3 / ms["model"]  # the model alone on every core, 1 thread each, batch 64
    work_ceiling = cores * 1e3 / sum(ms.values())  # read + cut + model, every core busy
    print(f"model-only ceiling ({cores} cores x 1 thread, batch 64, no reading or cutting): {model_ceiling:.1f} "
          f"sources/s; all of the engine's work on {cores} cores: {work_ceiling:.1f} sources/s")
    best = runs[f"engine_{cores}cpu"]
    print(f"DataLoader ({loader['workers']} workers + model in the main process): {rate(loader):.1f} sources/s overall, "
          f"{loader['steady_sources_per_s']:.1f} after its first batch ({loader['first_batch_s']:.1f} s)")
    print(f"engine ({cores} CPUs) vs DataLoader: overall {rate(best) / rate(loader):.2f}x, steady "
          f"{best['steady_sources_per_s'] / loader['steady_sources_per_s']:.2f}x (target >= 1.5x); steady vs "
          f"model-only ceiling {best['steady_sources_per_s'] / model_ceiling:.0%} (target >= 90%), vs the work "
          f"ceiling {best['steady_sources_per_s'] / work_ceiling:.0%}")
    for name, r in runs.items():
        print(f"{name}: Ray start-up {r['ray_startup_s']:.1f} s (not timed); model replicas ready after "
              f"{r['model_startup_s']:.1f} s (timed); after that {r['steady_sources_per_s']:.1f} sources/s "
              f"({r['steady_sources_per_s'] / rate(base):.1f}x baseline); task times are summed over workers")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": source, "cpu": cpu_model(), "cores": os.cpu_count(),
                                               "precision": enc.precision,
                                               "baseline": base, "engine_work_sequential": own, "dataloader": loader,
                                               "model_only_ceiling_sources_per_s": model_ceiling,
                                               "work_ceiling_sources_per_s": work_ceiling, **runs},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
