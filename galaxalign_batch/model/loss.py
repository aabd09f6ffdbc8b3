"""The contrastive loss of training across workers: global negatives with all-gathered features.

With N workers (a ``torch.distributed`` process group: gloo on CPU, NCCL on GPU) this follows
open_clip's ``--local-loss --gather-with-grad``: every worker all-gathers the features of every
modality **with gradient** (:func:`gather_rows`), computes the loss of **its own rows** against
**all columns** of the global batch, and the gradients that land on the gathered copies are summed
back to the worker that owns them (the gather's backward). Positives are the items of the same class
anywhere in the global batch (class ids are gathered too). The sum of the workers' losses divided by
N is exactly the single-process loss of the global batch (``ops.trimodal_contrastive_loss``), and so
are the parameter gradients once they are averaged over the workers (``model.distributed``): tested
in float64 (``tests/test_global_negatives.py``).

Per pair (A, B) on a worker holding rows ``r`` of a global batch of ``n`` items, with ``s`` the logit
scale::

    rows_r = sum_{i in r} [ lse_j(s A_i . B_j) - s mean_{j in pos(i)} A_i . B_j ]      (j over all n)
    cols_r = sum_{j in r} [ lse_i(s B_j . A_i) - s mean_{i in pos(j)} B_j . A_i ]      (i over all n)
    loss_r = (N / n) * 0.5 * (rows_r + cols_r)

The log-sum-exps are :func:`galaxalign_batch.ops.row_logsumexp` (``impl="fused"`` never builds the
``|r| x n`` logits: O((|r| + n) D) memory), the positive terms take O(n D) through class sums
(``sum_c (sum_{i in r, c} A_i) . (sum_{j in c} B_j) / |c|``). Without a process group, or with
``negatives="local"`` (each worker contrasts only its own batch: the behaviour before global
negatives), the loss is ``ops.trimodal_contrastive_loss`` of the worker's batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from galaxalign_batch import ops
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.ops import trimodal_contrastive_loss
from galaxalign_batch.ops.reference import PAIRS

NEGATIVES = ("global", "local")


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (the default group), ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """The number of rows every worker holds (one small all-gather)."""
    _, size = world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(out, mine, group=group)
    return [int(t) for t in out]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every worker's rows (padded to the largest count for the collective)."""
    top = max(sizes)
    x = x.contiguous()
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of rows whose backward sums the gradients of every worker's copy onto the owner's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
        ctx.sizes, ctx.process_group = sizes, group
        return _all_gather_rows(x, list(sizes), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, _ = world(ctx.process_group)
        sizes = ctx.sizes
        grad = grad.contiguous()
        if len(set(sizes)) == 1 and dist.get_backend(ctx.process_group) != dist.Backend.GLOO:
            out = torch.empty((sizes[rank], *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        else:  # gloo has no reduce-scatter: sum the whole gathered gradient, keep this worker's rows
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
            start = sum(sizes[:rank])
            out = grad[start:start + sizes[rank]]
        return out, None, None


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None, group=None) -> torch.Tensor:
    """All workers' rows of ``x`` concatenated in rank order, differentiable (gradients go back to the owners).

    ``sizes``: rows per worker (:func:`gather_sizes`); gathered when not given.
    """
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    if x.requires_grad:
        return _GatherWithGrad.apply(x, tuple(sizes), group)
    return _all_gather_rows(x, sizes, group)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _class_sums(x: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, inverse, x)


def contrastive_loss(
    image: torch.Tensor | None,
    text: torch.Tensor | None,
    symbol: torch.Tensor | None,
    logit_scale: torch.Tensor,
    class_ids: torch.Tensor | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    impl: str = "auto",
    *,
    negatives: str = "global",
    group=None,
) -> torch.Tensor:
    """This worker's share of the tri-modal loss of the global batch (see the module docstring).

    Arguments as :func:`galaxalign_batch.ops.trimodal_contrastive_loss`, for this worker's rows.
    ``negatives="global"`` (default) contrasts them with every worker's items; ``"local"`` only with
    this worker's. Averaged over the workers, the losses (and the gradients) are those of the
    global batch in one process. One worker, or no process group: exactly ``trimodal_contrastive_loss``.
    """
    if negatives not in NEGATIVES:
        raise ConfigError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    rank, size = world(group)
    if size == 1 or negatives == "local":
        return trimodal_contrastive_loss(image, text, symbol, logit_scale, class_ids=class_ids, weights=weights,
                                         impl=impl)
    feats = {"image": image, "text": text, "symbol": symbol}
    weights = tuple(float(w) for w in weights)
    used = [name for name in ("image", "text", "symbol")
            if any(w and name in pair for pair, w in zip(PAIRS, weights))]
    if not used:
        raise ConfigError("contrastive_loss: all three pair weights are 0")
    n = None
    for name in used:
        x = feats[name]
        if x is None or x.dim() != 2:
            raise ConfigError(f"contrastive_loss: {name} must be a 2-D (B, D) tensor (a pair using it has non-zero "
                              f"weight), got {None if x is None else tuple(x.shape)}")
        if n is not None and x.shape[0] != n:
            raise ConfigError(f"contrastive_loss: {name} has {x.shape[0]} rows, the others {n}")
        n = x.shape[0]
    device = feats[used[0]].device
    with torch.autocast(device.type, enabled=False):  # O(n D) parts and the statistics in fp32/fp64
        dtype = feats[used[0]].dtype
        for name in used[1:]:
            dtype = torch.promote_types(dtype, feats[name].dtype)
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        local = {name: feats[name].to(dtype) for name in used}
        scale = (logit_scale if isinstance(logit_scale, torch.Tensor)
                 else torch.tensor(float(logit_scale), device=device)).reshape(()).to(dtype)
        sizes = gather_sizes(n, device, group)
        start, total_n = sum(sizes[:rank]), sum(sizes)
        everyone = {name: gather_rows(local[name], sizes, group) for name in used}
        if class_ids is not None:
            if class_ids.shape != (n,) or class_ids.is_floating_point():
                raise ConfigError(f"contrastive_loss: class_ids must be an integer tensor of shape ({n},), "
                                  f"got {tuple(class_ids.shape)} {class_ids.dtype}")
            ids_all = gather_rows(class_ids.to(device=device, dtype=torch.int64), sizes, group)
            _, inverse_all = torch.unique(ids_all, return_inverse=True)
            k = int(inverse_all.max()) + 1
            counts = torch.bincount(inverse_all, minlength=k).to(dtype)
            inverse_own = inverse_all[start:start + n]

        def positive_sum(a_own: torch.Tensor, b_own: torch.Tensor, b_all: torch.Tensor) -> torch.Tensor:
            """``sum_{i own} mean_{j in pos(i)} a_i . b_j`` over the global batch, in O(n D)."""
            if class_ids is None:  # the positive of item i is its own partner
                return (a_own * b_own).sum()
            own_sums = _class_sums(a_own, inverse_own, k)
            all_sums = _class_sums(b_all, inverse_all, k)
            return ((own_sums * all_sums).sum(1) / counts).sum()

        loss = torch.zeros((), dtype=dtype, device=device)
        for (name_a, name_b), w in zip(PAIRS, weights):
            if w == 0:
                continue
            a, b, a_all, b_all = local[name_a], local[name_b], everyone[name_a], everyone[name_b]
            lse = ops.row_logsumexp(a, b_all, scale, impl=impl).sum() + ops.row_logsumexp(b, a_all, scale, impl=impl).sum()
            positive = positive_sum(a, b, b_all) + positive_sum(b, a, a_all)
            loss = loss + w * (size * 0.5 / total_n) * (lse - scale * positive)
    return loss
