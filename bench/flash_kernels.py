"""Each flash kernel alone (galaxalign_batch/ops/flash.py, Triton) against cuBLAS GEMMs of the same shape
measured in the same run, for a few tile configurations: where the flash path's time goes.

    python bench/flash_kernels.py [--json PATH] [--batch 16384] [--queries 1000] [--rows 500000]
                                  [--dtype bf16|fp16] [--sweep]

Kernels (D = 512): ``pair_lse_forward`` (the loss forward of one pair: tile pass + torch combine),
``pair_weights`` (the backward's tile pass, writes the n x n half weights), ``segment_maxima`` (the top-k
pre-selection, fp16 rows) and ``topk_update`` (the whole flash top-k of a resident matrix). Yardsticks:
``torch.mm`` of the same shape with fp32 output (what the ``tc`` path runs per tile) and with half output,
and the fp16 GEMM of the top-k shape. TFLOP/s count ``2 n m D`` per kernel (each does one GEMM's work).
``--sweep`` also times other tile sizes, warps and pipeline stages. Time: CUDA events, best of 5 after a
warm-up (compilation). With ``TRITON_INTERPRET=1`` and ``--smoke`` it runs on the CPU at toy sizes (a check
that the script works, no figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import torch  # noqa: E402

from galaxalign_batch.ops import flash  # noqa: E402

SWEEP = [
    {},  # the defaults of flash._config
    {"BN": 64, "num_warps": 4, "num_stages": 4},
    {"BM": 64, "num_warps": 4, "num_stages": 4},
    {"BK": 32, "num_stages": 4},
    {"BN": 256, "BK": 32, "num_stages": 3},
    {"num_warps": 4},
]


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, reps: int = 5) -> float:
            fn()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            return best
    else:
        def run(fn, reps: int = 1) -> float:
            fn()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _label(tiles: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in tiles.items()) or "default"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.smoke:
        if not flash.INTERPRET:
            parser.error("--smoke runs in Triton's interpreter: set TRITON_INTERPRET=1")
        device = torch.device("cpu")
        args.batch, args.queries, args.rows, args.dim = 96, 40, 2000, 64
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
        device = torch.device("cuda")
    reason = flash.why_unavailable(device)
    if reason:
        parser.error(reason)
    half = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    n, d = args.batch, args.dim
    run = _timer(device)
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device, half)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device, half)
    scale = torch.tensor(1 / 0.07, device=device)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu_model(),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": flash.triton.__version__, "batch": n, "dim": d,
              "dtype": args.dtype, "rows": [], "complete": False}

    def save() -> None:  # after every row, so a run stopped by its time limit (bench/gpu_check.sh) keeps them
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    def record(kernel: str, tiles: dict | None, seconds: float, flops: float, yardstick: float | None) -> None:
        entry = {"kernel": kernel, "tiles": _label(tiles or {}), "time_s": seconds, "tflops": flops / seconds / 1e12}
        if yardstick:
            entry["vs_cublas_fp32_out"] = entry["tflops"] / yardstick
        report["rows"].append(entry)
        save()
        extra = f"  {entry['vs_cublas_fp32_out']:.2f} of cuBLAS (fp32 output)" if yardstick else ""
        print(f"  {kernel:16s} {entry['tiles']:34s} {seconds * 1e3:9.3f} ms  {entry['tflops']:7.1f} TFLOP/s{extra}", flush=True)

    pair_flops = 2.0 * n * n * d
    print(f"device: {report['device']}; cpu: {report['cpu']}; torch {torch.__version__}, triton {report['triton']}", flush=True)
    print(f"loss pair, n = {n}, D = {d}, {args.dtype}:", flush=True)
    gemm_out = ({"out_dtype": torch.float32} if device.type == "cuda" else {})
    t_mm32 = run(lambda: torch.mm(a, b.T, **gemm_out))
    record("cuBLAS fp32 out", None, t_mm32, pair_flops, None)
    record("cuBLAS half out", None, run(lambda: torch.mm(a, b.T)), pair_flops, None)
    yard = pair_flops / t_mm32 / 1e12
    lse_row, lse_col = flash.pair_lse_forward(a, b, scale)
    weights = torch.empty((n, n), dtype=half, device=device)
    for tiles in (SWEEP if args.sweep else SWEEP[:1]):
        try:
            record("pair_lse_forward", tiles, run(lambda: flash.pair_lse_forward(a, b, scale, tiles=tiles)), pair_flops, yard)
            record("pair_weights", tiles, run(lambda: flash.pair_weights(a, b, scale, lse_row, lse_col, weights, tiles=tiles)),
                   pair_flops, yard)
        except Exception as exc:  # a configuration the GPU cannot run (shared memory, registers)
            print(f"  {_label(tiles)}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            report["rows"].append({"kernel": "pair", "tiles": _label(tiles), "error": str(exc).splitlines()[0]})
    weights = None  # free the n x n weights before the top-k

    nq, m = args.queries, args.rows
    print(f"top-k, N = {nq}, M = {m}, D = {d}, fp16 rows, k = 10:", flush=True)
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1).to(device)
    rows = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(device, torch.float16)
    topk_flops = 2.0 * nq * m * d
    q16 = q.half()
    t_mm = run(lambda: torch.mm(q16, rows.T, **gemm_out))
    record("cuBLAS fp32 out", None, t_mm, topk_flops, None)
    record("cuBLAS fp16 out", None, run(lambda: torch.mm(q16, rows.T)), topk_flops, None)
    yard = topk_flops / t_mm / 1e12
    for tiles in (SWEEP if args.sweep else SWEEP[:1]):
        try:
            record("segment_maxima", tiles, run(lambda: flash.segment_maxima(q, rows, tiles=tiles)), topk_flops, yard)
        except Exception as exc:
            print(f"  {_label(tiles)}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            report["rows"].append({"kernel": "segment_maxima", "tiles": _label(tiles), "error": str(exc).splitlines()[0]})

    def whole_topk():
        best_s = torch.full((nq, 10), -float("inf"), device=device)
        best_i = torch.full((nq, 10), -1, dtype=torch.int64, device=device)
        return flash.topk_update(q, rows, 0, 10, best_s, best_i)

    record("topk_update", None, run(whole_topk), topk_flops, yard)
    report["topk_fallback_queries"] = whole_topk()
    print(f"  queries recomputed exactly (not certified): {report['topk_fallback_queries']} of {nq}", flush=True)
    report["complete"] = True
    save()


if __name__ == "__main__":
    os.environ.setdefault("GALAXALIGN_PROGRESS", "0")
    main()
