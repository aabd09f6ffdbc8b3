"""`galaxalign-batch info`: versions, compiled modules, threads and devices."""

from __future__ import annotations

import argparse
import json


def collect() -> dict:
    import torch

    from galaxalign_batch import __version__, _core

    from galaxalign_batch.ops import backends

    info = {"galaxalign_batch": __version__, "torch": torch.__version__, "core": dict(_core.build_info()),
            "core_threads": _core.max_threads()}
    try:  # the CPU kernel level chosen at run time (GALAXALIGN_CPU_ISA=v2|v3|v4 forces one)
        info["cpu_kernels"] = _core.similarity_isa()
    except RuntimeError as e:
        info["cpu_kernels"] = f"error: {e}"
    try:  # bf16 loss kernels (AVX512-BF16; GALAXALIGN_CPU_BF16=0|1|auto), "" = bf16 inputs upcast to float32
        info["cpu_bf16_kernels"] = getattr(_core, "similarity_bf16", lambda: "")() or "none (bf16 upcast to float32)"
    except RuntimeError as e:
        info["cpu_bf16_kernels"] = f"error: {e}"
    from galaxalign_batch.model.precision import resolve_precision

    # what `embed`/`detect --train` run the model in on this CPU with --precision auto
    info["cpu_model_precision"] = resolve_precision("auto", "cpu")
    info["cpu_levels_supported"] = ["x86-64-v2"] + [f"x86-64-{lv}" for lv in ("v3", "v4")
                                                    if getattr(_core, f"cpu_supports_{lv}", lambda: False)()]
    info["cuda_available"] = torch.cuda.is_available()
    try:
        from galaxalign_batch import _cuda  # noqa: F401

        info["cuda_module"] = {"built": True, "runtime_version": _cuda.runtime_version(),
                               "devices": _cuda.device_count()}
    except ImportError as e:
        info["cuda_module"] = {"built": False, "why": str(e)}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        info["cuda_paths"] = {"loss": backends.cuda_loss_path(), "topk": backends.cuda_topk_path()}
    except Exception as e:  # a bad GALAXALIGN_CUDA_LOSS/TOPK value
        info["cuda_paths"] = f"error: {e}"
    from galaxalign_batch.ops import flash

    info["flash_kernels"] = (f"triton {flash.triton.__version__}" if flash.triton is not None
                             else "unavailable: triton is not installed")
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:{width}s} {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, compiled modules, threads and devices")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
