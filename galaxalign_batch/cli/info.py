"""`galaxalign-batch info`: versions, compiled modules, threads and devices; `info PATH ...`: what a model
file is (a checkpoint, a foundation, a head), from its header alone, or what an embedding store holds."""

from __future__ import annotations

import argparse
import json
import os
import sys


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


def _scalars(d: dict, limit: int = 10) -> str:
    items = [(k, v) for k, v in d.items() if isinstance(v, (str, int, float, bool)) and v not in ("", None)]
    return ", ".join(f"{k} {v}" for k, v in items[:limit])


def _head_lines(what: str, desc: dict) -> list[tuple[str, str]]:
    """Lines for the files of the downstream heads (each owner writes its own description)."""
    lines = [("kind", what + (f" ({desc['kind']})" if desc.get("kind") else ""))]
    if desc.get("classes"):
        lines.append(("classes", f"{len(desc['classes'])}: {', '.join(map(str, desc['classes']))}"))
    if desc.get("counts"):
        lines.append(("labels", ", ".join(f"{k} {v}" for k, v in desc["counts"].items())))
    val = desc.get("validation") or {}
    if val.get("n"):
        lines.append(("validation", f"{val.get('method')} on {val['n']} labels: accuracy {val.get('accuracy', 0):.3f}"
                                    + (f", AUC {val['auc']:.3f}" if val.get("auc") is not None else "")))
    enc = desc.get("encoder") or {}
    if enc:
        lines.append(("encoder", f"{enc.get('source')} (visual weights {enc.get('weights_digest')})"))
    source = desc.get("source") or {}
    if isinstance(source, dict) and source:
        model = source.get("model") or {}
        lines.append(("fitted on", ", ".join(filter(None, [
            f"store {source['store']}" if source.get("store") else None,
            f"model {model.get('name')} ({model.get('id')})" if isinstance(model, dict) and model else None])) or
            _scalars(source)))
    for key in ("training", "settings"):
        if isinstance(desc.get(key), dict) and desc[key]:
            lines.append((key, _scalars(desc[key])))
    lines.append(("saved", f"{desc.get('saved') or desc.get('created') or '?'}, galaxalign-batch "
                           f"{desc.get('code_version') or desc.get('software_version') or '?'}"))
    return lines


def describe_file(path: str) -> tuple[dict, list[tuple[str, str]]]:
    """``(JSON-able description, lines)`` of any weight file the project writes, or of an embedding store."""
    from galaxalign_batch.detection.files import META_KEY as DETECTOR, read_detector_info
    from galaxalign_batch.errors import ConfigError
    from galaxalign_batch.fewshot.heads import META_KEY as FEWSHOT, read_head_info as read_fewshot_info
    from galaxalign_batch.model import describe
    from galaxalign_batch.model.files import description_keys
    from galaxalign_batch.restoration.head import META_KEY as DENOISER, read_head_info as read_denoiser_info
    from galaxalign_batch.store import open_store, store_exists

    if os.path.isdir(path) and store_exists(path):
        store = open_store(path)
        lines = store.summary()
        return {"path": path, "kind": "embedding store", "description": store.attrs}, lines
    if os.path.isdir(path) or not os.path.isfile(path):
        d = describe.describe(path)  # a checkpoint folder; a missing file is its error
        return d, describe.summary(d)
    keys = description_keys(path)
    heads = {FEWSHOT: ("few-shot head (`fewshot --head FILE --apply`)", read_fewshot_info),
             DENOISER: ("denoising head (`restore --model FILE`)", read_denoiser_info),
             DETECTOR: ("source detector (`detect --model FILE`)", read_detector_info)}
    for key, (what, read) in heads.items():
        if key in keys:
            desc = read(path)
            return ({"path": path, "bytes": os.path.getsize(path), "kind": what, "description": desc},
                    _head_lines(what, desc))
    try:
        d = describe.describe(path)
    except ConfigError:
        raise ConfigError(f"{path}: a safetensors file, but none of galaxalign-batch's (a model, a foundation "
                          "or a head); an open_clip weights file is given as --model NAME:FILE") from None
    return d, describe.summary(d)


def run(args: argparse.Namespace) -> int:
    if args.models:
        from galaxalign_batch.errors import GalaxAlignError

        described, failed = [], 0
        for path in args.models:
            try:
                d, lines = describe_file(path)
            except GalaxAlignError as e:
                failed += 1
                print(f"error: {e}", file=sys.stderr)
                continue
            described.append(d)
            if not args.json:
                print(d["path"])
                width = max(len(k) for k, _ in lines)
                for k, v in lines:
                    print(f"  {k:{width}s}  {v}")
        if args.json:
            print(json.dumps(described if len(args.models) > 1 else (described or [None])[0], indent=2))
        return 1 if failed else 0
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:{width}s} {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, compiled modules, threads and devices; or what model files are",
                       description="Without PATH: versions, compiled modules, the kernel level chosen on this CPU, "
                                   "threads and devices. With PATH(s): what each file is (a GalaxAlign checkpoint, a "
                                   "foundation, a few-shot/denoising/detection head), read from its header: what made "
                                   "it, the cutouts and stretch it reads, its classes, what it was trained on and "
                                   "which model it started from; or what an embedding store holds (rows, model, "
                                   "stretch, selection, classification, few-shot heads).")
    p.add_argument("models", nargs="*", metavar="PATH",
                   help="a model file or checkpoint folder (model.safetensors), a compact foundation, a head file "
                        "or an embedding store")
    p.add_argument("--json", action="store_true", help="print as JSON (with PATH: the whole description)")
    p.set_defaults(func=run)
