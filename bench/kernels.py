"""Benchmark the fused similarity kernels against the composite PyTorch / faiss baselines.

Loss: ``galaxalign_batch.ops.trimodal_contrastive_loss(impl="fused")`` against the composite: three
open_clip ``ClipLoss`` terms on the same inputs (per pair ``logits = scale * A @ B.T`` and
``scale * B @ A.T``, cross-entropy both ways). Forward + backward wall time and peak extra memory
at B in {1024, 4096, 16384}, D = 512, each case in a fresh subprocess. Peak extra memory on CPU:
the process's peak RSS (VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus
its RSS before the step; this sees every allocation (torch's, the C++ kernels', glibc's). On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before the step.

Top-k: ``similarity_topk`` (fused) against faiss ``IndexFlatIP`` and chunked ``torch.matmul`` +
``topk``; N = 1000 queries, M = 500,000 rows, D = 512, k = 10, fp32 rows, then fp16 rows (compared
with the fp32 ``IndexFlatIP`` search, or with ``--faiss-fp16`` also faiss's fp16
``IndexScalarQuantizer``). Index building and conversions are not timed.

    python bench/kernels.py [--json PATH] [--device cpu|cuda] [--loss-sizes 1024,4096,16384]
                            [--topk-rows 500000] [--skip-loss] [--skip-topk] [--faiss-fp16]

On a CPU, ``--dtypes fp32,bf16`` runs both input types in one run: the bf16 fused loss (AVX512-BF16
kernels where the CPU has them, ``GALAXALIGN_CPU_BF16=0`` for the float32 upcast) is printed against the
fp32 fused loss, the fp32 and bf16 composites, and the machine's fp32 and bf16 GEMM (``torch.mm``), wall
and per core in process CPU time. A CPU without AVX512-BF16 emulates torch's bf16 products (0.3 GFLOP/s on a
Zen 3 EPYC): there the bf16 GEMM is timed at 512^3 and the bf16 composite only at B <= 1024.

Ratios are against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np
import torch

from galaxalign_batch.ops import backends

D = 512
TOPK_K = 10
TOPK_QUERIES = 1000
CHUNK_ROWS = 65536


def machine(device: str) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        from galaxalign_batch import _core

        info["core_isa"] = _core.similarity_isa()
        info["core_bf16"] = getattr(_core, "similarity_bf16", lambda: "")()
        info["core_build"] = dict(_core.build_info())
    except ImportError:
        info["core_isa"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- loss ----------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _loss_fn(impl: str):
    if impl.startswith("fused-"):  # fused-flash / fused-tc / fused-tc-torch / fused-simt: the CUDA path, by environment
        parts = impl.split("-")
        os.environ["GALAXALIGN_CUDA_LOSS"] = parts[1]
        os.environ["GALAXALIGN_CUDA_EPILOGUE"] = "torch" if "torch" in parts else "cuda"
        impl = "fused"
    if impl == "composite":
        from open_clip.loss import ClipLoss

        clip = ClipLoss()
        return lambda i, t, s, scale: clip(i, t, scale) + clip(i, s, scale) + clip(s, t, scale)
    from galaxalign_batch.ops import trimodal_contrastive_loss

    return lambda i, t, s, scale: trimodal_contrastive_loss(i, t, s, scale, impl="fused")


DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_case(impl: str, batch: int, reps: int, device: str, dtype: str = "fp32") -> dict:
    """One (implementation, batch, dtype) case, run in its own process: time and peak extra memory.

    ``tf32``: fp32 inputs with ``torch.set_float32_matmul_precision("high")`` (TF32 tensor cores for
    every fp32 GEMM, the composite's included); ``fp32``: the default ``highest`` precision."""
    dev = torch.device(device)
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    g = torch.Generator().manual_seed(batch)
    feats = [torch.nn.functional.normalize(torch.randn(batch, D, generator=g), dim=1).to(dev, DTYPES[dtype]).requires_grad_()
             for _ in range(3)]
    log_scale = torch.tensor(np.log(1 / 0.07), dtype=torch.float32, device=dev, requires_grad=True)
    fn = _loss_fn(impl)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(inputs) -> float:
        for x in inputs + [log_scale]:
            x.grad = None
        loss = fn(*inputs, log_scale.exp())
        loss.backward()
        sync()
        return float(loss.detach())

    # One small step first (thread pools, lazy initialisation), so only the batch's own memory counts.
    step([x[:256].detach().clone().requires_grad_() for x in feats])
    step([x[:256].detach().clone().requires_grad_() for x in feats])
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
    else:
        base = _rss_bytes()
        if _reset_hwm():
            method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the step"
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            method = "ru_maxrss delta (clear_refs unavailable: a lower bound)"
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        value = step(feats)
    except torch.OutOfMemoryError as exc:  # the composite at large B on a GPU
        return {"impl": impl, "batch": batch, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    elif method.startswith("VmHWM"):
        peak = _hwm_bytes() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times, cpu_times = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(feats)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    extra = {}
    if dev.type == "cpu" and impl == "fused" and dtype == "bf16":
        extra["bf16_kernels"] = backends.cpu_bf16_kernels()  # "" = upcast to fp32 (GALAXALIGN_CPU_BF16=0)
    if impl == "fused-flash" and DTYPES[dtype] == torch.float32:
        extra["path_used"] = "tc (the flash kernels take bf16/fp16 inputs; fp32 ones go to the tc path)"
    return {
        **extra,
        "impl": impl, "batch": batch, "dtype": dtype, "loss": value, "first_step_s": first,
        "time_s": min(times) if times else first, "timed_steps": len(times) or 1,
        "cpu_s": min(cpu_times) if cpu_times else first_cpu,
        "peak_extra_bytes": int(peak), "memory_method": method,
    }


_GEMM_CPU_RATE: dict[str, float] = {}  # dtype -> the CPU GEMM's TFLOP/s per core in process CPU time


def _gemm_tflops(dtype: str, device: str) -> float | None:
    """This machine's own GEMM throughput (TFLOP/s) in ``dtype``, the yardstick: an 8192^3 product on a
    GPU; on a CPU a 2048^3 ``torch.mm`` (MKL for fp32, oneDNN for bf16: AVX512-BF16 where the CPU has it)
    with the benchmark's thread count, best of 5. On a CPU the rate in process CPU time (per busy core, what
    a shared machine distorts least) is kept in ``_GEMM_CPU_RATE``."""
    dev = torch.device(device)
    size, reps = (8192, 10) if dev.type == "cuda" else (2048, 1)
    emulated = dev.type == "cpu" and dtype == "bf16" and not backends.cpu_has_native_bf16()
    if emulated:  # ~0.3 GFLOP/s on a Zen 3 EPYC: a 2048^3 product takes a minute, a 512^3 one a second
        size = 512
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    cpu_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=dev).to(DTYPES[dtype] if dev.type == "cuda" else cpu_dtype)
    b = torch.randn(size, size, device=dev).to(a.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(1 if emulated else 3):
        a @ b
    sync()
    best = best_cpu = float("inf")
    for _ in range(1 if dev.type == "cuda" else 2 if emulated else 5):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        sync()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    torch.set_float32_matmul_precision("highest")
    if dev.type == "cpu":
        _GEMM_CPU_RATE[dtype] = reps * 2 * size**3 / best_cpu / 1e12
    return reps * 2 * size**3 / best / 1e12


def run_loss(sizes: list[int], device: str, dtypes: list[str], impls: list[str], rows: list | None = None,
             saved=lambda: None) -> list[dict]:
    """The loss cases, appended to ``rows`` (a new list by default) one (dtype, batch) at a time, ``saved()``
    called after each: a step killed by its time limit (bench/gpu_check.sh) keeps what it measured."""
    rows = [] if rows is None else rows
    if device == "cpu" and "bf16" in dtypes:  # the bf16 path is compared with the fp32 GEMM as well
        _gemm_tflops("fp32", device)
    for dtype in dtypes:
        peak = _gemm_tflops(dtype, device)
        emulated = device == "cpu" and dtype == "bf16" and not backends.cpu_has_native_bf16()
        if device == "cuda":
            print(f"  {dtype} GEMM 8192^3 on this device: {peak:.0f} TFLOP/s", flush=True)
        else:
            gemm = "bf16" if dtype == "bf16" else "fp32"
            print(f"  {gemm} GEMM {512 if emulated else 2048}^3 (torch.mm, {torch.get_num_threads()} threads) on this machine: "
                  f"{peak * 1e3:.1f} GFLOP/s wall, {_GEMM_CPU_RATE[dtype] * 1e3:.1f} GFLOP/s per core in CPU time",
                  flush=True)
        if emulated:
            print("  this CPU has no AVX512-BF16: torch emulates bf16 (the GEMM above), so the bf16 composite runs "
                  "at B <= 1024 only (B = 4096 would take many minutes)", flush=True)
        for batch in sizes:
            reps = 5 if batch <= 1024 else 3 if batch <= 4096 else 0 if device == "cpu" else 3
            pair = {}
            for impl in impls:
                if emulated and impl == "composite" and batch > 1024:
                    pair[impl] = {"impl": impl, "batch": batch, "error": "skipped: bf16 emulated on this CPU"}
                    print(f"  loss {dtype} B={batch:6d} {impl:10s} skipped (bf16 emulated on this CPU)", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--_loss-case", impl, str(batch), str(reps), device, dtype]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    pair[impl] = {"impl": impl, "batch": batch, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
                else:
                    pair[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  loss {dtype} B={batch:6d} {impl:10s} " + _fmt_loss(pair[impl]), flush=True)
            c = pair.get("composite", {"error": "not run"})
            summary = {"batch": batch, "dtype": dtype, "gemm_tflops": peak, **pair}
            if device == "cpu" and dtype == "bf16":
                summary["bf16_kernels"] = pair.get("fused", {}).get("bf16_kernels", "")
            for impl in impls:
                f = pair[impl]
                if impl == "composite" or "error" in f:
                    continue
                if peak and impl in ("fused-flash", "fused-tc", "fused-tc-torch", "fused"):
                    # the blocked/flash paths' own GEMM work: per pair 1 product forward, 3 backward, 2 n^2 D each
                    # (the CPU kernels do the same work: one sweep forward, three products backward)
                    f["tflops"] = 3 * 4 * 2.0 * batch * batch * D / f["time_s"] / 1e12
                    f["fraction_of_gemm_peak"] = f["tflops"] / peak
                if "error" not in c:
                    f["speedup"] = c["time_s"] / f["time_s"]
                    f["memory_ratio"] = f["peak_extra_bytes"] / max(c["peak_extra_bytes"], 1)
                    f["loss_abs_diff"] = abs(f["loss"] - c["loss"])
                    line = (f"  -> {dtype} B={batch}: {impl} {f['speedup']:.2f}x the composite's speed, "
                            f"{f['memory_ratio']:.3f}x its peak extra memory, |loss diff| {f['loss_abs_diff']:.2e}")
                else:
                    line = f"  -> {dtype} B={batch}: {impl} ran; composite: {c.get('error')}"
                if "fraction_of_gemm_peak" in f:
                    rate = f"{f['tflops']:.0f} TFLOP/s" if device == "cuda" else f"{f['tflops'] * 1e3:.1f} GFLOP/s"
                    line += f"; {rate} = {f['fraction_of_gemm_peak']:.2f} of the {dtype} GEMM"
                    if device == "cpu":  # per core in process CPU time, against the GEMMs measured the same way
                        f["cpu_tflops"] = 3 * 4 * 2.0 * batch * batch * D / f["cpu_s"] / 1e12
                        f["cpu_fraction_of_gemm"] = {k: f["cpu_tflops"] / v for k, v in _GEMM_CPU_RATE.items()}
                        line += (f"; CPU time: {f['cpu_tflops'] * 1e3:.1f} GFLOP/s per core = "
                                 + ", ".join(f"{v:.2f} of the {k} GEMM" for k, v in f["cpu_fraction_of_gemm"].items()))
                print(line, flush=True)
            if device == "cpu" and "error" not in c and "error" not in pair.get("fused", {"error": 1}):
                f = pair["fused"]
                summary.update(speedup=c["time_s"] / f["time_s"], cpu_speedup=c["cpu_s"] / f["cpu_s"],
                               memory_ratio=f["peak_extra_bytes"] / max(c["peak_extra_bytes"], 1),
                               loss_abs_diff=abs(f["loss"] - c["loss"]))
            rows.append(summary)
            saved()
    if device == "cpu":  # bf16 against fp32 in the same run: the fused paths and the composites
        by = {(r["dtype"], r["batch"]): r for r in rows}
        for batch in sizes:
            b16, f32 = by.get(("bf16", batch), {}), by.get(("fp32", batch), {})
            fb = b16.get("fused", {})
            if "error" in fb or "time_s" not in fb:
                continue
            parts = []
            for label, other in (("fp32 fused", f32.get("fused")), ("fp32 composite", f32.get("composite")),
                                 ("bf16 composite", b16.get("composite"))):
                if other and "time_s" in other:
                    parts.append(f"{other['time_s'] / fb['time_s']:.2f}x ({other['cpu_s'] / fb['cpu_s']:.2f}x CPU time) "
                                 f"the {label}")
                    b16.setdefault("bf16_vs", {})[label] = {"wall": other["time_s"] / fb["time_s"],
                                                             "cpu": other["cpu_s"] / fb["cpu_s"]}
            if parts:
                print(f"  => B={batch}: bf16 fused ({b16.get('bf16_kernels') or 'upcast to fp32'}) is " + ", ".join(parts),
                      flush=True)
    return rows


def _fmt_loss(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    return (f"{r['time_s']:8.3f} s (min of {r['timed_steps']}; first {r['first_step_s']:.3f} s; CPU {r['cpu_s']:.3f} s)  "
            f"peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB  loss {r['loss']:.6f}")


# --- top-k ---------------------------------------------------------------------------------------

def _torch_chunked_topk(q: torch.Tensor, matrix, k: int, device: torch.device):
    best_s = best_i = None
    for start in range(0, matrix.shape[0], CHUNK_ROWS):
        rows = torch.as_tensor(matrix[start:start + CHUNK_ROWS]).to(device).float()
        s, i = torch.topk(q @ rows.T, k, dim=1)
        i = i + start
        if best_s is not None:
            s, pos = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
            i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
        best_s, best_i = s, i
    return best_s, best_i


def _timed(fn, sync):
    """(wall seconds, process CPU seconds, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _same_rows(a, b) -> float:
    a = torch.as_tensor(np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a))
    b = torch.as_tensor(np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b))
    return float((a == b).all(dim=1).double().mean())


def run_topk(rows: int, device: str, faiss_fp16: bool = False, results: list | None = None,
             saved=lambda: None) -> list[dict]:
    from galaxalign_batch.ops import similarity_topk

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    matrix = torch.empty(rows, D)
    for start in range(0, rows, CHUNK_ROWS):  # normalised rows, made in chunks
        block = torch.randn(min(CHUNK_ROWS, rows - start), D, generator=g)
        matrix[start:start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    queries = torch.nn.functional.normalize(torch.randn(TOPK_QUERIES, D, generator=g), dim=1)
    m32 = matrix.numpy()
    m16 = m32.astype(np.float16)
    print(f"  made {rows} x {D} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    flops = 2.0 * TOPK_QUERIES * rows * D
    results = [] if results is None else results
    q_dev = queries.to(dev)
    faiss_entry: dict = {}

    cases = [("fp32", m32), ("fp16", m16)]
    if dev.type == "cuda":  # the matrix already on the GPU: the kernel's own speed, no PCIe transfer
        cases += [("fp16-on-device", torch.from_numpy(m16).to(dev)), ("fp32-on-device", torch.from_numpy(m32).to(dev))]
    for label, mat in cases:
        entry = {"rows": label, "n": TOPK_QUERIES, "m": rows, "d": D, "k": TOPK_K}
        if dev.type == "cuda":  # warm-up (cuBLAS handles, kernel loading), then the best of three
            similarity_topk(q_dev, mat[:CHUNK_ROWS], TOPK_K, chunk_rows=CHUNK_ROWS, impl="fused")
            _torch_chunked_topk(q_dev, mat[:CHUNK_ROWS], TOPK_K, dev)
            sync()
        runs = [_timed(lambda: similarity_topk(q_dev, mat, TOPK_K, chunk_rows=CHUNK_ROWS, impl="fused"), sync)
                for _ in range(3 if dev.type == "cuda" else 1)]
        t_fused, entry["fused_cpu_s"], (s_f, i_f) = min(runs, key=lambda r: r[0])
        entry["fused_s"] = t_fused
        runs = [_timed(lambda: _torch_chunked_topk(q_dev, mat, TOPK_K, dev), sync) for _ in range(3 if dev.type == "cuda" else 1)]
        t_torch, entry["torch_chunked_cpu_s"], (s_t, i_t) = min(runs, key=lambda r: r[0])
        entry["torch_chunked_s"] = t_torch
        entry["same_rows_vs_torch"] = _same_rows(i_f, i_t)
        if dev.type == "cpu":
            import faiss

            if label == "fp32" or faiss_fp16:
                if label == "fp32":
                    index, name = faiss.IndexFlatIP(D), "faiss IndexFlatIP"
                else:
                    index = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                    index.train(m32[:1000])
                    name = "faiss IndexScalarQuantizer(QT_fp16)"
                index.add(m32)
                t_faiss, faiss_cpu, (s_x, i_x) = _timed(lambda: index.search(queries.numpy(), TOPK_K), sync)
                faiss_entry = {"faiss": name, "faiss_s": t_faiss, "faiss_cpu_s": faiss_cpu,
                               "faiss_threads": faiss.omp_get_max_threads(), "same_rows_vs_faiss": _same_rows(i_f, i_x)}
                del index
            # fp16 rows without --faiss-fp16: against the fp32 IndexFlatIP search of the same run
            entry.update(faiss_entry)
            entry["fused_over_faiss"] = t_fused / entry["faiss_s"]
        else:  # fp16 matrix-multiply throughput on this device, the GPU target's yardstick
            a = queries.half().to(dev)
            b = torch.as_tensor(m16[:CHUNK_ROWS]).to(dev)
            entry["path"] = os.environ.get("GALAXALIGN_CUDA_TOPK", "tc")
            a @ b.T
            sync()
            t_mm, _, _ = _timed(lambda: [a @ b.T for _ in range(10)], sync)
            mm_tflops = 10 * 2.0 * a.shape[0] * b.shape[0] * D / t_mm / 1e12
            entry.update({"fp16_matmul_tflops": mm_tflops, "fused_tflops": flops / t_fused / 1e12,
                          "fused_over_fp16_matmul": flops / t_fused / 1e12 / mm_tflops})
        entry["fused_gflops"] = flops / t_fused / 1e9
        entry["fused_over_torch"] = t_fused / t_torch
        results.append(entry)
        saved()
        line = f"  top-k {label}: fused {t_fused:.4f} s ({entry['fused_gflops']:.1f} GFLOP/s), torch chunked {t_torch:.4f} s"
        if "faiss_s" in entry:
            line += f", {entry['faiss']} {entry['faiss_s']:.2f} s -> fused/faiss = {entry['fused_over_faiss']:.2f}"
            line += f"; same top-k rows as faiss {entry['same_rows_vs_faiss']:.3f}"
        else:
            line += f" -> {entry['fused_over_fp16_matmul']:.2f} of fp16 matmul throughput"
        print(line + f", as torch {entry['same_rows_vs_torch']:.3f}", flush=True)
    return results


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--loss-sizes", default=None, help="comma-separated batch sizes (default 1024,4096,16384; +65536 on cuda)")
    parser.add_argument("--topk-rows", type=int, default=500_000)
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--skip-topk", action="store_true")
    parser.add_argument("--faiss-fp16", action="store_true",
                        help="also time faiss IndexScalarQuantizer(QT_fp16) for the fp16 rows (slow: no BLAS)")
    parser.add_argument("--dtypes", default="fp32", help="loss input types, comma-separated: fp32, tf32, bf16, fp16")
    parser.add_argument("--impls", default=None,
                        help="loss implementations (default: fused,composite on cpu; fused-flash,fused-tc,fused-simt,composite "
                             "on cuda)")
    parser.add_argument("--_loss-case", nargs=5, metavar=("IMPL", "B", "REPS", "DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._loss_case:
        impl, batch, reps, device, dtype = args._loss_case
        print(json.dumps(loss_case(impl, int(batch), int(reps), device, dtype)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    sizes = [int(x) for x in args.loss_sizes.split(",")] if args.loss_sizes else (
        [1024, 4096, 16384] + ([65536] if args.device == "cuda" else []))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(args.device),
              "device": args.device}
    print(f"machine: {report['machine']}", flush=True)
    t0 = time.perf_counter()

    def saved(complete: bool = False) -> None:  # after every case, so a killed run keeps its figures
        if args.json:
            report.update(complete=complete, total_s=time.perf_counter() - t0)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    if not args.skip_loss:
        print("loss (forward + backward, D=512):", flush=True)
        impls = args.impls.split(",") if args.impls else (
            ["fused-flash", "fused-tc", "fused-simt", "composite"] if args.device == "cuda" else ["fused", "composite"])
        report["loss"] = []
        run_loss(sizes, args.device, args.dtypes.split(","), impls, rows=report["loss"], saved=saved)
    if not args.skip_topk:
        print(f"top-k (N={TOPK_QUERIES}, M={args.topk_rows}, D={D}, k={TOPK_K}):", flush=True)
        report["topk"] = []
        run_topk(args.topk_rows, args.device, args.faiss_fp16, results=report["topk"], saved=saved)
    saved(complete=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
