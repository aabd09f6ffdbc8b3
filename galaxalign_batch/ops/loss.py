"""The contrastive losses' front ends: argument checks and the choice between the reference path
(:mod:`galaxalign_batch.ops.reference`) and the compiled kernels (:mod:`galaxalign_batch.ops.fused`,
:mod:`galaxalign_batch.ops.blocked`). Algorithms: ``docs/kernels.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.ops import reference
from galaxalign_batch.ops.backends import resolve_impl

__all__ = ["trimodal_contrastive_loss", "row_logsumexp"]

_FEATURE_NAMES = ("image", "text", "symbol")


def _check_loss_inputs(feats: dict[str, torch.Tensor | None], logit_scale: Any, class_ids, weights) -> tuple[torch.Tensor, tuple[float, float, float]]:
    if len(weights) != 3:
        raise ConfigError(f"weights must be three numbers (w_it, w_is, w_st), got {weights!r}")
    weights = tuple(float(w) for w in weights)
    if all(w == 0 for w in weights):
        raise ConfigError("trimodal_contrastive_loss: all three pair weights are 0")
    needed = set()
    for (a, b), w in zip(reference.PAIRS, weights):
        if w != 0:
            needed.update((a, b))
    shape = None
    device = None
    for name in _FEATURE_NAMES:
        x = feats[name]
        if x is None:
            if name in needed:
                raise ConfigError(f"trimodal_contrastive_loss: {name} is None but a pair using it has non-zero weight")
            continue
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ConfigError(f"trimodal_contrastive_loss: {name} must be a 2-D (B, D) tensor, got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ConfigError(f"trimodal_contrastive_loss: {name} must be floating point, got {x.dtype}")
        if shape is None:
            shape, device = tuple(x.shape), x.device
        elif tuple(x.shape) != shape:
            raise ConfigError(f"trimodal_contrastive_loss: {name} has shape {tuple(x.shape)}, expected {shape} like the others")
        elif x.device != device:
            raise ConfigError(f"trimodal_contrastive_loss: {name} is on {x.device}, the others on {device}")
    if shape[0] < 1 or shape[1] < 1:
        raise ConfigError(f"trimodal_contrastive_loss: empty features of shape {shape}")
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=device)
    if logit_scale.numel() != 1:
        raise ConfigError(f"trimodal_contrastive_loss: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    logit_scale = logit_scale.reshape(())
    if class_ids is not None:
        if not isinstance(class_ids, torch.Tensor) or class_ids.shape != (shape[0],) or class_ids.is_floating_point():
            raise ConfigError(f"trimodal_contrastive_loss: class_ids must be an integer tensor of shape ({shape[0]},), got {getattr(class_ids, 'shape', type(class_ids))}")
    return logit_scale, weights


def trimodal_contrastive_loss(
    image: torch.Tensor | None,
    text: torch.Tensor | None,
    symbol: torch.Tensor | None,
    logit_scale: torch.Tensor | float,
    class_ids: torch.Tensor | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    impl: str = "auto",
) -> torch.Tensor:
    """Tri-modal multi-positive InfoNCE: ``sum_p w_p * pair_loss_p`` over (image,text), (image,symbol), (symbol,text).

    For a pair (A, B) of normalised (B, D) features, ``L = s * A @ B.T``, positives are
    ``class_ids[i] == class_ids[j]`` (or ``i == j`` without class ids),
    ``row_i = logsumexp_j L[i,j] - mean_{j in pos(i)} L[i,j]``, likewise per column, and
    ``pair_loss = 0.5 * (mean_i row_i + mean_j col_j)``. Pairs of weight 0 are skipped and their
    features may be ``None``. ``logit_scale`` is the multiplier itself (pass ``exp(log_scale)``).
    Returns a scalar with gradients for the features and ``logit_scale``. The fused path keeps
    O(B * D) memory; the reference materialises three B x B matrices.
    """
    feats = {"image": image, "text": text, "symbol": symbol}
    logit_scale, weights = _check_loss_inputs(feats, logit_scale, class_ids, weights)
    present = [x for x in feats.values() if x is not None]
    dtype = present[0].dtype
    for x in present[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    if resolve_impl(impl, present[0].device, "trimodal_loss", dtype) == "reference":
        return reference.trimodal_loss(image, text, symbol, logit_scale, class_ids, weights)
    from galaxalign_batch.ops.fused import fused_trimodal_loss

    return fused_trimodal_loss(image, text, symbol, logit_scale, class_ids, weights)


def row_logsumexp(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, *, impl: str = "auto") -> torch.Tensor:
    """``logsumexp(logit_scale * a @ b.T, dim=1)`` for ``a`` (n, D) and ``b`` (m, D), ``n != m`` allowed.

    The building block of contrastive losses whose rows and columns differ, such as a worker's own
    rows against the all-gathered batch of every worker (global negatives). Differentiable in ``a``,
    ``b`` and ``logit_scale`` for any upstream gradient. ``impl="fused"`` (and ``"auto"``) is the
    blocked algorithm of :mod:`galaxalign_batch.ops.blocked`: tiles of rows through the vendor GEMM
    (tensor cores for bf16/fp16 on a GPU), never the ``n x m`` matrix, memory O(tile + (n + m) D); with
    ``GALAXALIGN_CUDA_LOSS=flash`` CUDA bf16/fp16 inputs go to :mod:`galaxalign_batch.ops.flash` instead;
    ``"reference"`` materialises the matrix. Returns float32 (float64 for float64 inputs), shape (n,).
    """
    if impl not in ("auto", "fused", "reference"):
        raise ConfigError(f"impl must be one of ('auto', 'fused', 'reference'), got {impl!r}")
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ConfigError(f"row_logsumexp: {name} must be a 2-D floating-point tensor, got {getattr(x, 'shape', type(x))}")
    if a.shape[1] != b.shape[1] or a.device != b.device:
        raise ConfigError(f"row_logsumexp: a {tuple(a.shape)} on {a.device} and b {tuple(b.shape)} on {b.device} "
                          "must have the same D and device")
    if b.shape[0] < 1:
        raise ConfigError("row_logsumexp: b has no rows")
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=a.device)
    if logit_scale.numel() != 1:
        raise ConfigError(f"row_logsumexp: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    logit_scale = logit_scale.reshape(())
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if impl == "reference":
        wd = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.logsumexp(logit_scale.to(wd) * (a.to(wd) @ b.to(wd).T), dim=1)
    from galaxalign_batch.ops import fused

    if fused.use_flash_loss(a):  # GALAXALIGN_CUDA_LOSS=flash, CUDA half inputs
        from galaxalign_batch.ops.flash import row_logsumexp as flash_row_logsumexp

        return flash_row_logsumexp(a, b, logit_scale)
    from galaxalign_batch.ops.blocked import row_logsumexp as blocked_row_logsumexp

    return blocked_row_logsumexp(a, b, logit_scale)
