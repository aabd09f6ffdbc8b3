"""Which compiled module serves a device: ``_core`` for CPU tensors, ``_cuda`` for CUDA tensors."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from types import ModuleType

import torch

from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

IMPLS = ("auto", "fused", "reference")
KERNEL_SYMBOLS = {"trimodal_loss": "trimodal_loss_forward", "topk": "topk_update", "prototype_probs": "prototype_probs"}
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"galaxalign_batch.{name}")
    except ImportError as exc:  # not built (no compiler / GALAXALIGN_CUDA=OFF) or broken
        log.debug("galaxalign_batch.%s not importable: %s", name, exc)
        return None


def module_for(device: torch.device) -> ModuleType | None:
    """The compiled kernel module for ``device`` (``_core`` / ``_cuda``), or None when it is not built."""
    if device.type == "cpu":
        return _load("_core")
    if device.type == "cuda":
        return _load("_cuda")
    return None


def kernel_module(device: torch.device, kernel: str) -> ModuleType | None:
    """The compiled module for ``device`` if it provides ``kernel`` (``trimodal_loss``, ``topk``, ``prototype_probs``)."""
    mod = module_for(device)
    if mod is None or not hasattr(mod, KERNEL_SYMBOLS[kernel]):
        return None
    return mod


def resolve_impl(impl: str, device: torch.device, kernel: str, dtype: torch.dtype | None = None) -> str:
    """``"fused"`` or ``"reference"`` for ``impl`` on ``device``; warns once when ``auto`` falls back on a GPU.

    CUDA kernels take float32/bfloat16/float16 (float64 CUDA tensors use the reference); CPU kernels
    compute in float64 or float32 (half types are upcast to float32), and the loss takes bfloat16 as it
    is where the CPU has AVX512-BF16 (:func:`cpu_bf16_kernels`).
    """
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return "reference"
    if device.type == "cuda" and dtype is not None and dtype not in CUDA_DTYPES:
        if impl == "fused":
            raise ConfigError(f"impl='fused': the CUDA kernels take {', '.join(map(str, CUDA_DTYPES))}, got {dtype}")
        return "reference"
    if kernel_module(device, kernel) is not None:
        return "fused"
    if device.type == "cuda" and _served_without_cuda_module(kernel):
        return "fused"
    module = "_cuda" if device.type == "cuda" else "_core"
    what = f"galaxalign_batch.{module} ({kernel}) for device {device}"
    if impl == "fused":
        raise ConfigError(f"impl='fused' but no compiled kernel {what} is available")
    if device.type == "cuda" and what not in _warned:
        _warned.add(what)
        warnings.warn(f"no compiled kernel {what}; falling back to the PyTorch reference", RuntimeWarning, stacklevel=3)
    return "reference"


def _served_without_cuda_module(kernel: str) -> bool:
    """Whether a CUDA ``kernel`` runs fused without the compiled ``_cuda`` module (not built: no nvcc at
    install, ``GALAXALIGN_CUDA=OFF``): the loss on the ``tc`` path (cuBLAS tile products, torch epilogue)
    and the ``flash`` path (Triton for bf16/fp16, ``tc`` for fp32); the top-k on the ``flash`` path. The
    ``simt`` kernels, ``tc``'s top-k selection and ``prototype_probs`` need ``_cuda``. A flash path without
    Triton is the flash dispatch's error (:func:`galaxalign_batch.ops.fused.use_flash_loss`), not a fallback."""
    if kernel == "trimodal_loss":
        return cuda_loss_path() in ("tc", "flash")
    return kernel == "topk" and cuda_topk_path() == "flash"


CUDA_LOSS_PATHS = ("tc", "simt", "flash")


def cuda_loss_path() -> str:
    """The CUDA loss path: ``tc`` (default: blocked, tile products on cuBLAS tensor cores, see
    ``ops/blocked.py``), ``simt`` (the hand-written CUDA-core kernels of ``_cuda``) or ``flash`` (Triton
    kernels with the statistics in the GEMM's epilogue, ``ops/flash.py``; bf16/fp16 inputs, fp32 ones take
    ``tc``), chosen by ``GALAXALIGN_CUDA_LOSS``."""
    path = os.environ.get("GALAXALIGN_CUDA_LOSS", "tc").lower()
    if path not in CUDA_LOSS_PATHS:
        raise ConfigError(f"GALAXALIGN_CUDA_LOSS must be one of {CUDA_LOSS_PATHS}, got {path!r}")
    return path


def cuda_topk_path() -> str:
    """The CUDA top-k path: ``tc`` (default: cuBLAS score tile, then the ``_cuda`` selection kernel),
    ``simt`` (one hand-written kernel) or ``flash`` (Triton: segment maxima in the GEMM's epilogue, then
    an exact re-scoring of the best segments, ``ops/flash.py``), chosen by ``GALAXALIGN_CUDA_TOPK``."""
    path = os.environ.get("GALAXALIGN_CUDA_TOPK", "tc").lower()
    if path not in CUDA_LOSS_PATHS:
        raise ConfigError(f"GALAXALIGN_CUDA_TOPK must be one of {CUDA_LOSS_PATHS}, got {path!r}")
    return path


def cpu_bf16_kernels() -> str:
    """The CPU's bf16 loss kernels in use (``"x86-64-v4 + AVX512-BF16"``), or ``""`` when bf16 features are
    upcast to float32: chosen by ``_core`` from the CPU (AVX512-BF16) and ``GALAXALIGN_CPU_BF16`` (0, 1, auto)."""
    core = module_for(torch.device("cpu"))
    if core is None or not hasattr(core, "similarity_bf16"):
        return ""
    return core.similarity_bf16()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU (and ``_core``'s build) has AVX512-BF16, whatever ``GALAXALIGN_CPU_BF16`` says: without it
    torch emulates bf16 products (0.3 GFLOP/s for a 2048^3 ``mm`` on a Zen 3 EPYC, fp32 90 per core). False when
    ``_core`` is not built."""
    core = module_for(torch.device("cpu"))
    return bool(core is not None and getattr(core, "cpu_supports_bf16", lambda: False)())


def cpu_threads() -> int:
    """Threads for the CPU kernels: torch's intra-op thread count, so one setting governs both."""
    return max(1, torch.get_num_threads())
