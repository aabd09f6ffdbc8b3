"""Row access of the similarity matrices: torch tensors, numpy arrays (memmaps included) or any
array-like with ``.shape`` and row slicing (a zarr array), read a chunk of rows at a time.

Shared by :mod:`galaxalign_batch.ops.topk` (the front ends and the reference path) and
:mod:`galaxalign_batch.ops.fused` (the compiled kernels).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from galaxalign_batch.errors import ConfigError

__all__ = ["matrix_shape", "iter_row_chunks", "to_tensor", "numpy_rows", "host_or_device_rows"]


def matrix_shape(matrix: Any) -> tuple[int, int]:
    shape = getattr(matrix, "shape", None)
    if shape is None or len(shape) != 2:
        raise ConfigError(f"similarity_topk: matrix must be 2-D (M, D) with .shape and row slicing, got {type(matrix).__name__} with shape {shape}")
    return int(shape[0]), int(shape[1])


def to_tensor(rows: Any, device: torch.device) -> torch.Tensor:
    """A chunk of rows as a float32/float16 tensor on ``device`` (other dtypes become float32)."""
    if isinstance(rows, torch.Tensor):
        t = rows
    else:
        arr = np.asarray(rows)
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4) or not arr.dtype.isnative or not arr.flags.writeable:
            half = arr.dtype.kind == "f" and arr.dtype.itemsize == 2
            arr = arr.astype(np.float16 if half else np.float32)  # a native, writable copy torch may own
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype not in (torch.float16, torch.float32):
        t = t.float()
    return t.to(device, non_blocking=True).contiguous()


def iter_row_chunks(matrix: Any, chunk_rows: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, rows)`` for consecutive chunks of ``matrix`` as contiguous tensors on ``device``."""
    m, _ = matrix_shape(matrix)
    for start in range(0, m, chunk_rows):
        yield start, to_tensor(matrix[start:min(start + chunk_rows, m)], device)


def numpy_rows(rows: Any) -> np.ndarray:
    """A chunk of matrix rows as a C-contiguous float32 or float16 numpy array."""
    if isinstance(rows, torch.Tensor):
        rows = rows.detach()
        if rows.dtype not in (torch.float32, torch.float16):
            rows = rows.float()
        return rows.cpu().contiguous().numpy()
    arr = np.asarray(rows)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4) or not arr.dtype.isnative:
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def host_or_device_rows(rows: Any) -> torch.Tensor:
    """A chunk as a tensor (read on the loader thread; moved to the GPU on the caller's stream)."""
    t = rows.detach() if isinstance(rows, torch.Tensor) else torch.from_numpy(numpy_rows(rows))
    return t if t.dtype in (torch.float32, torch.float16) else t.float()
