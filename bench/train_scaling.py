"""Training across workers: throughput, memory ceiling of the loss, and what global negatives buy.

Three sections (``--section``), each printing a Markdown table and writing JSON (``--json``):

- ``throughput``: steps/s and peak memory per worker of whole training steps of ``galaxalign-tiny``
  (tri-modal stage 2: image, symbol and text encoders, all three pairs; AdamW step included) on
  1 and 2 workers (a gloo group on loopback, ``model.distributed.launch_local``, one torch thread
  per worker) at the same global batch, reference and fused loss, plus 1 worker accumulating 2
  micro-batches (``--accum-steps 2``). Random images and prompts; timing after one warm-up step.
- ``memory``: the largest global batch whose **loss part of a step** fits in ``--limit-gib`` per
  worker, on 2 workers: the cached features of the global batch (image and text, D = 128 as
  ``galaxalign-tiny``), the all-gather, the global-negatives loss of the image-text pair with class
  ids and its backward down to the features, which is what ``--accum-steps`` leaves to the loss
  (the encoders run one micro-batch at a time, so their memory does not grow with the batch and is
  not included). Each case in a fresh pair of processes; peak memory per worker = the process's
  peak RSS (VmHWM, everything: interpreter, torch, the features, the loss). The reference is
  searched upward in steps of ``--step`` until it no longer fits; the fused loss is then run at
  1, 2, 4 and 8 times the reference's largest batch (``--fused-factors``).
- ``accuracy``: validation accuracy after the same number of epochs of ``galaxalign-batch train
  --mode image-text`` on a simulated labelled set (``--data``): 2 Ray Train workers with global
  negatives, 2 workers with local-only negatives (``--negatives local``), and 1 worker at the
  global batch; every run sees the same items in the same steps (workers split each step's items).

    python bench/train_scaling.py --section throughput [--global-batch 64] [--steps 5]
    python bench/train_scaling.py --section memory [--limit-gib 4] [--step 2048]
- ``pretrain``: ``galaxalign-batch pretrain`` on survey tiles (``--tiles``, e.g. a simulated sky) for
  ``--steps`` steps at the same global batch (``--global-batch``): in one process with 1 thread (the
  baseline) and with as many threads as workers, and on 2 Ray Train workers (``--workers 2``, 1 thread
  each, global negatives). Steps/s from the run's own clock (its summary's ``seconds``: reading and
  cutting the tiles included, Ray's start-up not), the wall time of the command beside it.

    python bench/train_scaling.py --section accuracy --data SIM [--epochs 12] [--batch-size 16] [--seeds 0 1]
    python bench/train_scaling.py --section pretrain --tiles SKY [--steps 60] [--global-batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

os.environ.setdefault("GALAXALIGN_PROGRESS", "0")

GIB = 1 << 30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- throughput

def _throughput_worker(rank: int, size: int, global_batch: int, accum: int, impl: str, steps: int, seed: int) -> dict:
    import numpy as np
    import torch

    from galaxalign_batch.model.distributed import MicroBatch, broadcast_parameters, step_gradients
    from galaxalign_batch.model.train import TrainConfig, _param_groups, build_model

    torch.manual_seed(seed)
    model = build_model(TrainConfig(data="unused", out="unused"))
    model.init_symbol_encoder()
    model.set_trainable("all")
    broadcast_parameters(model)
    optimizer = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-4)
    rss_model = _status("VmRSS")
    per_micro = global_batch // size // accum
    rng = np.random.default_rng([seed, rank])
    vocab = model.vocabulary

    def micro() -> MicroBatch:
        labels = rng.integers(0, len(vocab), per_micro)
        texts = [vocab.prompts(int(c))[0] for c in labels]
        uniq = sorted(set(texts))
        return MicroBatch(images=model.prepare_images(torch.from_numpy(rng.random((per_micro, 3, 64, 64), np.float32))),
                          labels=torch.from_numpy(labels),
                          symbols=model.prepare_images(torch.from_numpy(rng.random((per_micro, 3, 64, 64), np.float32))),
                          tokens=model.tokenize(uniq), inverse=torch.tensor([uniq.index(t) for t in texts]))

    batches = [[micro() for _ in range(accum)] for _ in range(steps + 1)]
    times, cpu = [], []
    for i, step in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        step_gradients(model, step, weights=(1.0, 1.0, 1.0), impl=impl)
        optimizer.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"seconds_per_step": float(np.median(times)), "cpu_seconds_per_step": float(np.median(cpu)),
            "peak_rss": _status("VmHWM"), "rss_model": rss_model}


def section_throughput(args) -> dict:
    from galaxalign_batch.model.distributed import launch_local

    rows = []
    g = args.global_batch
    cases = [(1, 1, "reference", g, args.steps), (1, 1, "fused", g, args.steps), (2, 1, "reference", g, args.steps),
             (2, 1, "fused", g, args.steps), (1, 2, "fused", g, args.steps)]
    if args.large_accum:  # one worker at a large effective batch: micro-batches of 32
        cases.append((1, args.large_accum, "fused", 32 * args.large_accum, 1))
    for workers, accum, impl, global_batch, steps in cases:
        t0 = time.perf_counter()
        out = launch_local(_throughput_worker, workers, global_batch, accum, impl, steps, 0, threads=1, timeout=3600)
        sps = 1.0 / max(o["seconds_per_step"] for o in out)
        row = {"workers": workers, "accum_steps": accum, "per_worker_micro_batch": global_batch // workers // accum,
               "global_batch": global_batch, "loss": impl, "steps_per_s": sps, "timed_steps": steps,
               "images_per_s": sps * global_batch,
               "cpu_s_per_step_all_workers": sum(o["cpu_seconds_per_step"] for o in out),
               "peak_rss_gib_per_worker": max(o["peak_rss"] for o in out) / GIB,
               "rss_after_model_gib": max(o["rss_model"] for o in out) / GIB, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"  B={global_batch}, {workers} worker(s) x accum {accum}, {impl}: {sps:.3f} steps/s, "
              f"{row['cpu_s_per_step_all_workers']:.2f} CPU-s per step, "
              f"peak {row['peak_rss_gib_per_worker']:.2f} GiB per worker", flush=True)
    lines = ["tri-modal stage 2 (3 encoders, 3 pairs), median of the timed steps after one warm-up step",
             "", "| global batch | workers | accum steps | micro-batch per worker | loss | timed steps | steps/s | images/s "
             "| CPU-s per step (all workers) | peak RSS per worker (GiB) |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['global_batch']} | {r['workers']} | {r['accum_steps']} | {r['per_worker_micro_batch']} | "
                     f"{r['loss']} | {r['timed_steps']} | "
                     f"{r['steps_per_s']:.3f} | {r['images_per_s']:.1f} | {r['cpu_s_per_step_all_workers']:.2f} | "
                     f"{r['peak_rss_gib_per_worker']:.2f} |")
    return {"rows": rows, "table": "\n".join(lines)}


# ---------------------------------------------------------------------------------------------- memory

def _memory_worker(rank: int, size: int, global_batch: int, dim: int, impl: str) -> dict:
    import torch
    import torch.nn.functional as F

    from galaxalign_batch.model.loss import contrastive_loss

    n = global_batch // size
    g = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    text = F.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    labels = torch.randint(0, 10, (n,), generator=g)
    scale = torch.tensor(14.3, requires_grad=True)
    before = _status("VmRSS")
    t0 = time.perf_counter()
    loss = contrastive_loss(image, text, None, scale, class_ids=labels, weights=(1.0, 0.0, 0.0), impl=impl)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"peak_rss": _status("VmHWM"), "rss_before": before, "seconds": seconds, "loss": loss.item()}


def _memory_case(global_batch: int, dim: int, impl: str, workers: int) -> dict:
    from galaxalign_batch.model.distributed import launch_local

    out = launch_local(_memory_worker, workers, global_batch, dim, impl, threads=1, timeout=3600)
    row = {"global_batch": global_batch, "loss": impl, "workers": workers,
           "peak_rss_gib_per_worker": max(o["peak_rss"] for o in out) / GIB,
           "extra_gib_per_worker": max(o["peak_rss"] - o["rss_before"] for o in out) / GIB,
           "seconds": max(o["seconds"] for o in out), "loss_value": out[0]["loss"]}
    print(f"  B={global_batch} {impl}: peak {row['peak_rss_gib_per_worker']:.2f} GiB per worker "
          f"(+{row['extra_gib_per_worker']:.2f} for the loss), {row['seconds']:.1f} s", flush=True)
    return row


def section_memory(args) -> dict:
    rows = []
    b, ref_max = args.step, None
    while True:  # the reference, upward until it no longer fits
        row = _memory_case(b, args.dim, "reference", args.workers)
        rows.append(row)
        if row["peak_rss_gib_per_worker"] > args.limit_gib:
            break
        ref_max = b
        b += args.step
    if ref_max is None:
        raise SystemExit(f"the reference does not fit {args.limit_gib} GiB even at B = {args.step}")
    fused_max = None
    for factor in args.fused_factors:
        row = _memory_case(ref_max * factor, args.dim, "fused", args.workers)
        row["factor_of_reference_max"] = factor
        rows.append(row)
        if row["peak_rss_gib_per_worker"] <= args.limit_gib:
            fused_max = ref_max * factor
    lines = [f"{args.workers} workers, loss part of a step (image-text pair, D = {args.dim}, class ids), "
             f"limit {args.limit_gib} GiB per worker", "",
             "| global batch | loss | peak RSS per worker (GiB) | of which the loss step (GiB) | fits | seconds |",
             "|---:|---|---:|---:|---|---:|"]
    for r in rows:
        fits = "yes" if r["peak_rss_gib_per_worker"] <= args.limit_gib else "no"
        lines.append(f"| {r['global_batch']:,} | {r['loss']} | {r['peak_rss_gib_per_worker']:.2f} | "
                     f"{r['extra_gib_per_worker']:.2f} | {fits} | {r['seconds']:.1f} |")
    lines += ["", f"largest measured global batch within {args.limit_gib} GiB per worker: reference {ref_max:,} "
                  f"(the next step, {ref_max + args.step:,}, does not fit); fused >= {fused_max or 0:,} "
                  f"({(fused_max or 0) / ref_max:.0f}x the reference; larger batches not run)"]
    return {"rows": rows, "reference_max": ref_max, "fused_max_measured": fused_max, "table": "\n".join(lines)}


# ---------------------------------------------------------------------------------------------- accuracy

def _train_run(args, out: Path, seed: int, workers: int, batch: int, negatives: str) -> dict:
    cmd = [sys.executable, "-m", "galaxalign_batch", "--no-progress", "train", "--data", str(args.data), "--out", str(out),
           "--mode", "image-text", "--epochs", str(args.epochs), "--batch-size", str(batch), "--lr", str(args.lr),
           "--seed", str(seed), "--no-resume", "--workers", str(workers), "--negatives", negatives]
    if workers == 0:
        cmd += ["--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    return {"command": shlex.join(cmd), "seed": seed, "workers": max(1, workers), "negatives": negatives,
            "batch": summary["batch"], "global_step": summary["global_step"], "val_accuracy": summary["val_accuracy"],
            "wall_s": time.perf_counter() - t0}


def section_accuracy(args) -> dict:
    if not args.data:
        raise SystemExit("--section accuracy needs --data (a simulated labelled set: galaxalign-batch simulate --labelled)")
    root = Path(args.work)
    rows = []
    for seed in args.seeds:
        for name, workers, batch, negatives in (("2 workers, global negatives", 2, args.batch_size, "global"),
                                                ("2 workers, local negatives", 2, args.batch_size, "local"),
                                                ("1 worker, global batch", 0, 2 * args.batch_size, "global")):
            row = _train_run(args, root / f"seed{seed}-{name.replace(' ', '_').replace(',', '')}", seed, workers,
                             batch, negatives)
            row["run"] = name
            rows.append(row)
            print(f"  seed {seed}, {name}: val acc {row['val_accuracy']}, {row['global_step']} steps, "
                  f"{row['wall_s']:.0f} s", flush=True)
    lines = [f"image-text, {args.epochs} epochs, global batch {2 * args.batch_size}, lr {args.lr}", "",
             "| seed | run | global batch | negatives per item | steps | val acc (text prototypes) | wall s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        negs = r["batch"]["global_batch"] if r["negatives"] == "global" else r["batch"]["per_worker_batch"]
        lines.append(f"| {r['seed']} | {r['run']} | {r['batch']['global_batch']} | {negs} | {r['global_step']} | "
                     f"{r['val_accuracy']['text']:.3f} | {r['wall_s']:.0f} |")
    return {"rows": rows, "table": "\n".join(lines)}


# ---------------------------------------------------------------------------------------------- pretrain

def _pretrain_run(args, out: Path, workers: int, threads: int) -> dict:
    batch = args.global_batch // max(1, workers)
    cmd = [sys.executable, "-m", "galaxalign_batch", "--no-progress", "pretrain", "--tiles", *args.tiles,
           "--out", str(out), "--batch-size", str(batch), "--epochs", "50", "--max-steps", str(args.steps),
           "--checkpoint-every", str(10 ** 6), "--threads", str(threads), "--no-resume", "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS=str(threads), RAY_AUTH_MODE="disabled")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "pretrain_summary.json").read_text())
    return {"command": shlex.join(cmd), "workers": max(1, workers), "threads_per_process": threads,
            "per_worker_batch": batch, "global_batch": summary.get("global_batch", batch), "steps": summary["global_step"],
            "run_s": summary["seconds"], "wall_s": time.perf_counter() - t0,
            "steps_per_s": summary["global_step"] / summary["seconds"]}


def section_pretrain(args) -> dict:
    if not args.tiles:
        raise SystemExit("--section pretrain needs --tiles (e.g. galaxalign-batch simulate --out SKY)")
    root = Path(args.work)
    rows = []
    for name, workers, threads in (("1 process, 1 thread", 0, 1), ("1 process, 2 threads", 0, 2),
                                   ("2 Ray Train workers, 1 thread each", 2, 1)):
        row = _pretrain_run(args, root / f"pretrain-{workers}-{threads}", workers, threads)
        row["run"] = name
        rows.append(row)
        print(f"  {name}: {row['steps']} steps in {row['run_s']:.1f} s ({row['steps_per_s']:.2f} steps/s), "
              f"wall {row['wall_s']:.0f} s", flush=True)
    base = rows[0]["steps_per_s"]
    lines = [f"pretrain, global batch {args.global_batch} sources (two views + a caption each), {args.steps} steps", "",
             "| run | per-worker batch | steps/s | sources/s | vs 1 process, 1 thread | run s | wall s (with start-up) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['per_worker_batch']} | {r['steps_per_s']:.3f} | "
                     f"{r['steps_per_s'] * r['global_batch']:.1f} | {r['steps_per_s'] / base:.2f}x | {r['run_s']:.1f} | "
                     f"{r['wall_s']:.0f} |")
    return {"rows": rows, "table": "\n".join(lines)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=["throughput", "memory", "accuracy", "pretrain"], required=True)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--global-batch", type=int, default=64, help="throughput, pretrain: items per step, all workers")
    p.add_argument("--steps", type=int, default=None,
                   help="throughput: timed steps after one warm-up step (default 5); pretrain: steps (default 60)")
    p.add_argument("--large-accum", type=int, default=32,
                   help="throughput: also 1 worker with this many micro-batches of 32 (one timed step); 0: skip")
    p.add_argument("--limit-gib", type=float, default=4.0, help="memory: per-worker limit")
    p.add_argument("--step", type=int, default=2048, help="memory: the reference's search step (global batch)")
    p.add_argument("--fused-factors", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8],
                   help="memory: the fused loss at these multiples of the reference's largest batch")
    p.add_argument("--dim", type=int, default=128, help="memory: feature dimension")
    p.add_argument("--workers", type=int, default=2, help="memory: workers")
    p.add_argument("--data", default=None, help="accuracy: a simulated labelled set")
    p.add_argument("--tiles", nargs="+", default=None, help="pretrain: survey tiles (a simulated sky)")
    p.add_argument("--work", default="/tmp/galaxalign-train-scaling", help="accuracy, pretrain: where the runs go")
    p.add_argument("--epochs", type=int, default=12, help="accuracy: epochs of every run")
    p.add_argument("--batch-size", type=int, default=16, help="accuracy: per-worker batch of the 2-worker runs")
    p.add_argument("--lr", type=float, default=1e-3, help="accuracy: learning rate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="accuracy: seeds")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 60 if args.section == "pretrain" else 5
    t0 = time.perf_counter()
    load = os.getloadavg()
    print(f"machine: {cpu_model()} x {os.cpu_count()} cores; load average {load[0]:.1f} at start", flush=True)
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    result = {"throughput": section_throughput, "memory": section_memory, "accuracy": section_accuracy,
              "pretrain": section_pretrain}[args.section](args)
    import torch

    result.update(section=args.section, command=shlex.join(["python", *sys.argv]),
                  machine={"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version(), "loadavg_start": load, "loadavg_end": os.getloadavg(),
                           "peak_rss_driver_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)},
                  seconds=time.perf_counter() - t0)
    print(result["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
