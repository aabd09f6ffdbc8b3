"""Pure PyTorch reference implementations (materialise the full matrices).

These are the ground truth the fused kernels are tested against and the fallback when no
compiled kernel is available for a tensor's device. Memory grows with ``B**2`` (loss) and
``N * M`` (top-k), so use them for checking, small batches, or as the last resort.
"""

from __future__ import annotations

from typing import Any

import torch

from galaxalign_batch.ops.rows import iter_row_chunks

PAIRS = (("image", "text"), ("image", "symbol"), ("symbol", "text"))
"""The three pair terms of the tri-modal loss, in the order of ``weights``: (A, B) of ``A @ B.T``."""


def positive_mask(class_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """``pos[i, j]``: same class when ``class_ids`` is given, else the diagonal (``i == j``)."""
    if class_ids is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    ids = class_ids.to(device)
    return ids[:, None] == ids[None, :]


def pair_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE of one pair: ``0.5 * (mean_i row_i + mean_j col_j)``.

    ``L = s * a @ b.T``; ``row_i = logsumexp_j L[i, j] - mean_{j: pos[i, j]} L[i, j]`` and the
    same down the columns.
    """
    logits = logit_scale * (a @ b.T)
    pos = positive_mask(class_ids, a.shape[0], a.device).to(logits.dtype)
    count = pos.sum(1)  # pos is symmetric: the column counts are the same
    pos_logits = logits * pos
    row = torch.logsumexp(logits, dim=1) - pos_logits.sum(1) / count
    col = torch.logsumexp(logits, dim=0) - pos_logits.sum(0) / count
    return 0.5 * (row.mean() + col.mean())


def trimodal_loss(
    image: torch.Tensor | None,
    text: torch.Tensor | None,
    symbol: torch.Tensor | None,
    logit_scale: torch.Tensor,
    class_ids: torch.Tensor | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """``sum_p w_p * pair_loss_p`` over (image,text), (image,symbol), (symbol,text); zero weights skipped.

    Arguments are assumed validated (see :func:`galaxalign_batch.ops.trimodal_contrastive_loss`).
    """
    feats = {"image": image, "text": text, "symbol": symbol}
    total = None
    for (name_a, name_b), w in zip(PAIRS, weights):
        if w == 0:
            continue
        term = float(w) * pair_loss(feats[name_a], feats[name_b], logit_scale, class_ids)
        total = term if total is None else total + term
    return total


def similarity_topk(queries: torch.Tensor, matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of each query against every row of ``matrix`` (full ``N x M`` matrix).

    Ties are ordered by lower row index (a stable descending sort). Scores are float32.
    """
    scores = queries.float() @ matrix.float().T
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k].contiguous(), order.indices[:, :k].contiguous()


def merge_topk(best_s: torch.Tensor | None, best_i: torch.Tensor | None, s: torch.Tensor, i: torch.Tensor, k: int):
    """Merge two candidate lists (scores, row indices), best ``k`` first; the running list ``best_*`` holds
    lower row indices than the new one, so a stable sort keeps ties by lower index."""
    if best_s is not None:
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    order = torch.sort(s, dim=1, descending=True, stable=True)
    return order.values[:, :k], torch.gather(i, 1, order.indices[:, :k])


def streamed_topk(queries: torch.Tensor, matrix: Any, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`similarity_topk` over ``matrix`` read ``chunk_rows`` rows at a time (any array-like, see
    :func:`galaxalign_batch.ops.similarity_topk`), merging each chunk's best into the running list."""
    q = queries.float()
    best_s = best_i = None
    for start, rows in iter_row_chunks(matrix, chunk_rows, q.device):
        s, i = similarity_topk(q, rows, min(k, rows.shape[0]))
        best_s, best_i = merge_topk(best_s, best_i, s, i + start, k)
    return best_s.contiguous(), best_i.contiguous()


def prototype_probs(features: torch.Tensor, prototypes: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``softmax(s * features @ prototypes.T)`` over the K prototypes, shape (N, K)."""
    return torch.softmax(logit_scale * (features @ prototypes.T), dim=1)
