"""Streamed similarity top-k and class-prototype scoring.

``matrix`` may be a torch tensor, a numpy array (memmaps included) or any array-like with
``.shape`` and row slicing (a zarr array): it is read ``chunk_rows`` rows at a time, so it may be
larger than memory. Ties are ordered by the lower row index.
"""

from __future__ import annotations

from typing import Any

import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.ops import reference
from galaxalign_batch.ops.backends import resolve_impl
from galaxalign_batch.ops.rows import matrix_shape

DEFAULT_CHUNK_ROWS = 65536


def _check_topk(queries: torch.Tensor, matrix: Any, k: int, chunk_rows: int) -> tuple[int, int]:
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ConfigError(f"similarity_topk: queries must be a 2-D (N, D) tensor, got {getattr(queries, 'shape', type(queries))}")
    m, d = matrix_shape(matrix)
    if queries.shape[1] != d:
        raise ConfigError(f"similarity_topk: queries have D={queries.shape[1]} but the matrix rows have D={d}")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"similarity_topk: k must be a positive integer, got {k!r}")
    if k > m:
        raise ConfigError(f"similarity_topk: k={k} is larger than the number of matrix rows M={m}")
    if chunk_rows < 1:
        raise ConfigError(f"similarity_topk: chunk_rows must be positive, got {chunk_rows}")
    return m, d


@torch.no_grad()
def similarity_topk(queries: torch.Tensor, matrix: Any, k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products ``queries @ matrix.T`` per query without the ``N x M`` matrix.

    ``matrix`` rows (float32 or float16) are streamed ``chunk_rows`` at a time to the queries'
    device. Returns ``(scores (N, k) float32, indices (N, k) int64)``, best first; equal scores
    are ordered by lower row index.
    """
    _check_topk(queries, matrix, k, chunk_rows)
    if resolve_impl(impl, queries.device, "topk") == "reference":
        return reference.streamed_topk(queries, matrix, k, chunk_rows)
    from galaxalign_batch.ops.fused import fused_topk

    return fused_topk(queries, matrix, k, chunk_rows)


def prototype_probs(features: torch.Tensor, prototypes: torch.Tensor, logit_scale: torch.Tensor | float, *, impl: str = "auto") -> torch.Tensor:
    """Softmax over K class prototypes of ``logit_scale * features @ prototypes.T``, shape (N, K) float32.

    The fused path writes only the (N, K) output.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ConfigError(f"prototype_probs: features must be a 2-D (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        raise ConfigError(f"prototype_probs: prototypes must be (K, {features.shape[1]}), got {getattr(prototypes, 'shape', type(prototypes))}")
    if prototypes.shape[0] < 1:
        raise ConfigError("prototype_probs: no prototypes")
    scale = float(logit_scale)
    if resolve_impl(impl, features.device, "prototype_probs") == "reference":
        return reference.prototype_probs(features.float(), prototypes.to(features.device).float(), scale)
    from galaxalign_batch.ops.fused import fused_prototype_probs

    return fused_prototype_probs(features, prototypes.to(features.device), scale)
