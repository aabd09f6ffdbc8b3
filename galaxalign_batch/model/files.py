"""The project's weight files: one safetensors file holding the tensors and, in its header, a JSON
description under one key, written atomically.

Model checkpoints (:mod:`galaxalign_batch.model.checkpoint`, key ``galaxalign``), few-shot heads
(:mod:`galaxalign_batch.fewshot.heads`, ``galaxalign_fewshot_head``) and denoising heads
(:mod:`galaxalign_batch.restoration.head`) are all this format; each owns its description and this
module owns the file: atomic replace, the check of the format name and version, a checksum of
the tensors (safetensors has none: a copy with a flipped byte in its tensor data loads silently), and
one-line errors for a file that is missing, torn, damaged or of another kind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from galaxalign_batch import atomic
from galaxalign_batch.errors import ConfigError

__all__ = ["write_weights", "read_description", "read_weights", "has_checksum", "tensors_checksum",
           "description_keys"]

#: header key of the checksum of every tensor (name, dtype, shape, bytes), written by :func:`write_weights`
CHECKSUM_KEY = "galaxalign_tensors_sha256"


def tensors_checksum(tensors: Mapping[str, Any]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes (torch tensors or numpy arrays alike)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if type(t).__module__.startswith("torch"):
            import torch

            dtype, shape = str(t.dtype).removeprefix("torch."), tuple(t.shape)
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            import numpy as np

            a = np.ascontiguousarray(t)
            dtype, shape, data = str(a.dtype), tuple(a.shape), a.tobytes()
        h.update(f"{name}|{dtype}|{shape}|".encode())
        h.update(data)
    return h.hexdigest()


def write_weights(path: str | os.PathLike, tensors: Mapping[str, Any], key: str, description: dict) -> Path:
    """Write ``tensors`` (torch tensors or numpy arrays, not mixed) and ``description`` (JSON-able,
    stored in the header under ``key``) to ``path`` atomically: a reader sees the old file or the new
    one, never a part. Returns the path."""
    path = Path(path)
    if any(type(v).__module__.startswith("torch") for v in tensors.values()):
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    meta = {key: json.dumps(description), CHECKSUM_KEY: tensors_checksum(tensors)}
    with atomic.replacing(path) as tmp:
        save_file(dict(tensors), tmp, metadata=meta)
    return path


def _header(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a safetensors file ({' '.join(str(e).split())})") from None


def description_keys(path: str | os.PathLike) -> set[str]:
    """The header keys of ``path`` (which of the project's descriptions it carries), no tensors read."""
    return set(_header(path))


def has_checksum(path: str | os.PathLike) -> bool:
    """Whether ``path`` carries the tensors' checksum (files written before it was added do not)."""
    return CHECKSUM_KEY in _header(path)


def read_description(path: str | os.PathLike, key: str, fmt: str, max_version: int, what: str) -> dict:
    """The description stored under ``key`` in ``path``'s header (no tensors read), checked to be of
    format ``fmt`` at most version ``max_version``; ``what`` names the kind of file in errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    meta = _header(path)
    if key not in meta:
        raise ConfigError(f"{path}: a safetensors file without a {what} description (not a {what} file)")
    try:
        info = json.loads(meta[key])
    except ValueError:
        raise ConfigError(f"{path}: the {what} description is not JSON") from None
    if not isinstance(info, dict) or info.get("format") != fmt or int(info.get("format_version", 0)) > max_version:
        got = info.get("format") if isinstance(info, dict) else None
        version = info.get("format_version") if isinstance(info, dict) else None
        raise ConfigError(f"{path}: unsupported {what} format {got!r} v{version}")
    return info


def read_weights(path: str | os.PathLike, framework: str = "pt") -> dict:
    """Every tensor of ``path``: torch tensors on the CPU (``framework="pt"``) or numpy arrays, checked
    against the checksum written with them (when the file has one)."""
    from safetensors import SafetensorError

    try:
        if framework == "pt":
            from safetensors.torch import load_file

            tensors = load_file(str(path), device="cpu")
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the weights ({' '.join(str(e).split())})") from None
    recorded = _header(path).get(CHECKSUM_KEY)
    if recorded and tensors_checksum(tensors) != recorded:
        raise ConfigError(f"{path}: damaged: its weights do not match the checksum written with them; use another "
                          "copy or re-create it")
    return tensors
