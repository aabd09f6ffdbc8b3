"""Fused similarity kernels: the tri-modal contrastive loss and streamed top-k / prototype scoring.

Every function takes ``impl``: ``"reference"`` (pure PyTorch, materialises the matrices),
``"fused"`` (the compiled kernels: ``_core`` for CPU tensors, ``_cuda`` for CUDA tensors; error
when missing) or ``"auto"`` (fused when available for the tensors' device, else reference).
See ``docs/kernels.md`` for the algorithms.

Modules: :mod:`~galaxalign_batch.ops.loss` (loss front ends), :mod:`~galaxalign_batch.ops.topk`
(top-k and prototype front ends), :mod:`~galaxalign_batch.ops.reference` (pure PyTorch),
:mod:`~galaxalign_batch.ops.fused` and :mod:`~galaxalign_batch.ops.blocked` (compiled kernels and
vendor-GEMM tiles), :mod:`~galaxalign_batch.ops.backends` (which kernel module runs),
:mod:`~galaxalign_batch.ops.rows` (row access of large matrices).
"""

from __future__ import annotations

from galaxalign_batch.ops import reference
from galaxalign_batch.ops.loss import row_logsumexp, trimodal_contrastive_loss
from galaxalign_batch.ops.topk import prototype_probs, similarity_topk

__all__ = ["trimodal_contrastive_loss", "row_logsumexp", "similarity_topk", "prototype_probs", "reference"]
