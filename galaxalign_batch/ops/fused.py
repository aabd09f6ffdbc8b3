"""Autograd Functions over the compiled kernels, dispatched on the tensors' device.

CPU tensors go to ``galaxalign_batch._core`` (numpy views of the tensors through the buffer
protocol, no copies); CUDA tensors to ``galaxalign_batch._cuda`` (raw ``data_ptr()`` values plus
the current stream handle, so the extension needs no torch headers). See ``docs/kernels.md``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.ops import backends, blocked
from galaxalign_batch.ops import reference
from galaxalign_batch.ops.reference import PAIRS
from galaxalign_batch.ops.rows import host_or_device_rows, matrix_shape, numpy_rows

log = logging.getLogger(__name__)
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cuda() -> Any:
    mod = backends.module_for(torch.device("cuda"))
    if mod is None:  # resolve_impl checked this already; keep the error clear if called directly
        raise RuntimeError("galaxalign_batch._cuda is not built")
    return mod


# ------------------------------------------------------------------------------------------------
# Contrastive loss


def _bf16_bits(x: torch.Tensor):
    """A contiguous bfloat16 CPU tensor as a numpy view of its uint16 bits (numpy has no bfloat16)."""
    return x.detach().view(torch.uint16).numpy()


def use_flash_loss(x: torch.Tensor) -> bool:
    """Whether the loss statistics of ``x``'s pairs go to the flash kernels (``GALAXALIGN_CUDA_LOSS=flash``,
    a CUDA tensor of bf16/fp16, Triton importable; a missing Triton is an error, not a silent fallback)."""
    if x.device.type != "cuda" or backends.cuda_loss_path() != "flash" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    from galaxalign_batch.ops import flash

    reason = flash.why_unavailable(x.device)
    if reason:
        raise ConfigError(f"GALAXALIGN_CUDA_LOSS=flash: {reason}")
    return True


def _lse_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = a.shape[0]
    if use_flash_loss(a):
        from galaxalign_batch.ops import flash

        return flash.pair_lse_forward(a, b, scale.float())
    if a.device.type == "cuda" and backends.cuda_loss_path() in ("tc", "flash"):  # flash: fp32 inputs take tc
        return blocked.pair_lse_forward(a, b, scale.float())
    if a.device.type == "cpu" and a.dtype == torch.bfloat16:  # AVX512-BF16 kernels: fp32 statistics
        lse_row = torch.empty(n, dtype=torch.float32)
        lse_col = torch.empty(n, dtype=torch.float32)
        backends.module_for(a.device).trimodal_loss_forward_bf16(
            _bf16_bits(a), _bf16_bits(b), float(scale), lse_row.numpy(), lse_col.numpy(), backends.cpu_threads()
        )
        return lse_row, lse_col
    if a.device.type == "cpu":
        lse_row = torch.empty(n, dtype=a.dtype)
        lse_col = torch.empty(n, dtype=a.dtype)
        backends.module_for(a.device).trimodal_loss_forward(
            a.detach().numpy(), b.detach().numpy(), float(scale), lse_row.numpy(), lse_col.numpy(), backends.cpu_threads()
        )
        return lse_row, lse_col
    lse_row = torch.empty(n, dtype=torch.float32, device=a.device)
    lse_col = torch.empty(n, dtype=torch.float32, device=a.device)
    scale32 = scale.float().reshape(1).contiguous()
    _cuda().trimodal_loss_forward(
        a.data_ptr(), b.data_ptr(), n, a.shape[1], _CUDA_DTYPE_CODES[a.dtype], scale32.data_ptr(),
        lse_row.data_ptr(), lse_col.data_ptr(), _cuda_stream(a.device), _cuda_index(a.device),
    )
    return lse_row, lse_col


def _lse_backward_into(a, b, scale, lse_row, lse_col, coef: float, grad_a, grad_b):
    """Add the gradients of ``coef * (sum lse_row + sum lse_col)`` into grad_a/grad_b; return d/dscale."""
    if use_flash_loss(a):
        from galaxalign_batch.ops import flash

        return flash.pair_lse_backward_into(a, b, scale.float(), lse_row, lse_col, coef, grad_a, grad_b)
    if a.device.type == "cuda" and backends.cuda_loss_path() in ("tc", "flash"):
        return blocked.pair_lse_backward_into(a, b, scale.float(), lse_row, lse_col, coef, grad_a, grad_b).float()
    if a.device.type == "cpu" and a.dtype == torch.bfloat16:  # fp32 gradient buffers
        return backends.module_for(a.device).trimodal_loss_backward_bf16(
            _bf16_bits(a), _bf16_bits(b), float(scale), lse_row.numpy(), lse_col.numpy(), coef,
            grad_a.numpy(), grad_b.numpy(), backends.cpu_threads(),
        )
    if a.device.type == "cpu":
        return backends.module_for(a.device).trimodal_loss_backward(
            a.detach().numpy(), b.detach().numpy(), float(scale), lse_row.numpy(), lse_col.numpy(), coef,
            grad_a.numpy(), grad_b.numpy(), backends.cpu_threads(),
        )
    grad_scale = torch.zeros(1, dtype=torch.float32, device=a.device)
    scale32 = scale.float().reshape(1).contiguous()
    coef32 = torch.full((1,), coef, dtype=torch.float32, device=a.device)
    _cuda().trimodal_loss_backward(
        a.data_ptr(), b.data_ptr(), a.shape[0], a.shape[1], _CUDA_DTYPE_CODES[a.dtype], scale32.data_ptr(),
        lse_row.data_ptr(), lse_col.data_ptr(), coef32.data_ptr(), grad_a.data_ptr(), grad_b.data_ptr(),
        grad_scale.data_ptr(), _cuda_stream(a.device), _cuda_index(a.device),
    )
    return grad_scale.reshape(())


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _class_sums(x: torch.Tensor, classes) -> torch.Tensor:
    inverse, counts = classes
    return torch.zeros(counts.shape[0], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def _positive_sum(a: torch.Tensor, b: torch.Tensor, classes) -> torch.Tensor:
    """``sum_i mean_{j in pos(i)} a_i . b_j`` in O(n d): ``sum_c (sum_{i in c} a_i) . (sum_{j in c} b_j) / |c|``."""
    a, b = _at_least_float32(a), _at_least_float32(b)
    if classes is None:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return ((_class_sums(a, classes) * _class_sums(b, classes)).sum(1) / classes[1].to(a.dtype)).sum()


def _add_positive_grad(grad_x: torch.Tensor, other: torch.Tensor, classes, alpha: float) -> None:
    """``grad_x[i] += alpha * mean_{j in pos(i)} other_j``, in place."""
    other = _at_least_float32(other)
    if classes is None:
        grad_x.add_(other.to(grad_x.dtype), alpha=alpha)
        return
    means = _class_sums(other, classes) / classes[1].to(other.dtype)[:, None]
    grad_x.add_(means[classes[0]].to(grad_x.dtype), alpha=alpha)


class TrimodalLoss(torch.autograd.Function):
    """``sum_p w_p * (0.5/n * (sum_i lse_row_i + sum_j lse_col_j) - (s/n) * positive_sum_p)``, fused.

    ``pairs`` lists ``(index_a, index_b, weight)`` into ``features``. Forward keeps only the O(n)
    log-sum-exp vectors of each pair; backward recomputes the tiles from them and accumulates every
    pair's gradients in place into one buffer per feature, so the extra memory is O(n * d).
    """

    @staticmethod
    def forward(ctx, pairs, classes, scale: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(scale.device.type, enabled=False):  # the O(n d) torch parts stay in fp32
            return TrimodalLoss._forward(ctx, pairs, classes, scale, features)

    @staticmethod
    def _forward(ctx, pairs, classes, scale: torch.Tensor, features) -> torch.Tensor:
        n = features[0].shape[0]
        out_dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=out_dtype, device=scale.device)
        saved = []
        for ia, ib, w in pairs:
            lse_row, lse_col = _lse_forward(features[ia], features[ib], scale)
            positive = _positive_sum(features[ia], features[ib], classes).to(out_dtype)
            saved += [lse_row, lse_col, positive]
            lse_part = (lse_row.sum() + lse_col.sum()).to(out_dtype) * (0.5 / n)
            total = total + w * (lse_part - scale * positive / n)
        ctx.pairs, ctx.classes, ctx.n_features = pairs, classes, len(features)
        ctx.save_for_backward(scale, *features, *saved)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        scale, features, per_pair = saved[0], saved[1:1 + ctx.n_features], saved[1 + ctx.n_features:]
        n = features[0].shape[0]
        g, s = float(grad), float(scale)
        cpu_exact = features[0].device.type == "cpu" and features[0].dtype in (torch.float32, torch.float64)
        acc_dtype = features[0].dtype if cpu_exact else torch.float32  # CUDA, and bf16 on a CPU: fp32 buffers
        grads = [torch.zeros(f.shape, dtype=acc_dtype, device=f.device) for f in features]
        grad_scale = torch.zeros((), dtype=scale.dtype, device=scale.device)
        for p, (ia, ib, w) in enumerate(ctx.pairs):
            lse_row, lse_col, positive = per_pair[3 * p:3 * p + 3]
            a, b = features[ia], features[ib]
            ds = _lse_backward_into(a, b, scale, lse_row, lse_col, g * w * 0.5 / n, grads[ia], grads[ib])
            grad_scale = grad_scale + ds - g * w * positive / n
            _add_positive_grad(grads[ia], b, ctx.classes, -g * w * s / n)
            _add_positive_grad(grads[ib], a, ctx.classes, -g * w * s / n)
        grads = [gr.to(f.dtype) for gr, f in zip(grads, features)]
        return (None, None, grad_scale.to(scale.dtype), *grads)


def fused_trimodal_loss(image, text, symbol, logit_scale, class_ids, weights) -> torch.Tensor:
    """The fused path of :func:`galaxalign_batch.ops.trimodal_contrastive_loss` (arguments validated there)."""
    named = {"image": image, "text": text, "symbol": symbol}
    present = [name for name in ("image", "text", "symbol") if named[name] is not None]
    device = named[present[0]].device
    dtype = named[present[0]].dtype
    for name in present[1:]:
        dtype = torch.promote_types(dtype, named[name].dtype)
    if device.type == "cpu":  # float64, float32, or bfloat16 where the AVX512-BF16 kernels run; else float32
        if dtype not in (torch.float64, torch.bfloat16) or (dtype == torch.bfloat16 and not backends.cpu_bf16_kernels()):
            dtype = torch.float32
    elif dtype not in backends.CUDA_DTYPES:
        dtype = torch.float32
    position = {name: i for i, name in enumerate(present)}
    features = [named[name].to(dtype).contiguous() for name in present]
    pairs = tuple((position[a], position[b], float(w)) for (a, b), w in zip(PAIRS, weights) if w != 0)
    scale = logit_scale.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    classes = None
    if class_ids is not None:
        _, inverse = torch.unique(class_ids.to(device), return_inverse=True)
        classes = (inverse, torch.bincount(inverse))
    return TrimodalLoss.apply(pairs, classes, scale, *features)


# ------------------------------------------------------------------------------------------------
# Top-k and prototypes


def fused_topk(queries: torch.Tensor, matrix: Any, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused path of :func:`galaxalign_batch.ops.similarity_topk` (arguments validated there).

    The next chunk is read on a helper thread while the kernel (which releases the GIL) scores
    the current one, so a matrix read from disk (zarr, memmap) overlaps I/O with compute.
    """
    m, _ = matrix_shape(matrix)
    n = queries.shape[0]
    device = queries.device
    if use_flash_topk(queries, matrix):
        from galaxalign_batch.ops import flash

        q = queries.detach().float().contiguous()
        best_s = torch.full((n, k), -float("inf"), dtype=torch.float32, device=device)
        best_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
        if isinstance(matrix, torch.Tensor) and matrix.device == device:
            # resident rows need no streaming: chunks as large as the (n, rows / SEG) segment maxima allow
            budget_rows = blocked.tile_budget_bytes(device) * flash.SEG // max(1, 4 * n)
            chunk_rows = max(chunk_rows, budget_rows // flash.SEG * flash.SEG)
        load = lambda s: host_or_device_rows(matrix[s:min(s + chunk_rows, m)])  # noqa: E731
        fallbacks = [0]

        def update(s: int, rows: torch.Tensor) -> None:
            rows = rows.to(device).contiguous()
            fallbacks[0] += flash.topk_update(q, rows, s, k, best_s, best_i)

        def result():
            log.debug("similarity_topk (flash): %d query-chunks recomputed exactly (uncertified)", fallbacks[0])
            return best_s, best_i
    elif device.type == "cpu":
        load = lambda s: numpy_rows(matrix[s:min(s + chunk_rows, m)])  # noqa: E731
        q = queries.detach().float().contiguous().numpy()
        best_s = np.full((n, k), -np.inf, dtype=np.float32)
        best_i = np.full((n, k), -1, dtype=np.int64)
        core = backends.module_for(device)
        update = lambda s, rows: core.topk_update(q, rows, s, best_s, best_i, backends.cpu_threads())  # noqa: E731
        result = lambda: (torch.from_numpy(best_s), torch.from_numpy(best_i))  # noqa: E731
    elif backends.module_for(device) is None:  # flash top-k without _cuda, queries it cannot pre-select
        log.debug("similarity_topk: galaxalign_batch._cuda is not built; the reference serves these queries")
        return reference.streamed_topk(queries, matrix, k, chunk_rows)
    else:
        load = lambda s: host_or_device_rows(matrix[s:min(s + chunk_rows, m)])  # noqa: E731
        q = queries.detach().float().contiguous()
        best_s = torch.full((n, k), -float("inf"), dtype=torch.float32, device=device)
        best_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
        cuda = _cuda()
        tc = backends.cuda_topk_path() in ("tc", "flash") and hasattr(cuda, "topk_scores_update")
        q_hi, q_lo = blocked.split_half(q) if tc else (None, None)  # fp16 rows: two fp16 GEMMs (hi + lo)
        budget = blocked.tile_budget_bytes(device)

        def update(s: int, rows: torch.Tensor) -> None:
            rows = rows.to(device).contiguous()  # on this thread's current stream, before the kernel
            if tc:  # the score tile from cuBLAS (fp16 rows: fp16 tensor cores, fp32 accumulate), then selection
                step = max(1, min(n, budget // max(1, 4 * rows.shape[0])))
                for q0 in range(0, n, step):
                    if rows.dtype == torch.float16:
                        scores = blocked.split_scores(q_hi[q0:q0 + step], q_lo[q0:q0 + step], rows)
                    else:
                        scores = blocked.mm_f32(q[q0:q0 + step], rows.T).contiguous()
                    cuda.topk_scores_update(
                        scores.data_ptr(), scores.shape[0], rows.shape[0], scores.shape[1], s, k,
                        best_s[q0:q0 + step].data_ptr(), best_i[q0:q0 + step].data_ptr(), _cuda_stream(device),
                        _cuda_index(device),
                    )
                return
            cuda.topk_update(
                q.data_ptr(), n, q.shape[1], rows.data_ptr(), rows.shape[0], rows.dtype == torch.float16, s, k,
                best_s.data_ptr(), best_i.data_ptr(), _cuda_stream(device), _cuda_index(device),
            )

        result = lambda: (best_s, best_i)  # noqa: E731
    starts = list(range(0, m, chunk_rows))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0])
        for pos, start in enumerate(starts):
            rows = pending.result()
            if pos + 1 < len(starts):
                pending = pool.submit(load, starts[pos + 1])
            update(start, rows)
    return result()


def use_flash_topk(queries: torch.Tensor, matrix: Any) -> bool:
    """Whether the flash top-k serves these queries: ``GALAXALIGN_CUDA_TOPK=flash``, CUDA queries, and for fp16
    rows queries within half of fp16's range (else the ``tc`` path serves them). A missing Triton is an error."""
    if queries.device.type != "cuda" or backends.cuda_topk_path() != "flash":
        return False
    from galaxalign_batch.ops import flash

    reason = flash.why_unavailable(queries.device)
    if reason:
        raise ConfigError(f"GALAXALIGN_CUDA_TOPK=flash: {reason}")
    half = getattr(matrix, "dtype", None) in (torch.float16, np.float16)
    if half and not flash.fits_fp16(queries):
        log.debug("similarity_topk: queries beyond fp16's range, the tc path serves them")
        return False
    return True


def fused_prototype_probs(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """The fused path of :func:`galaxalign_batch.ops.prototype_probs`: writes only the (N, K) output."""
    n, k = features.shape[0], prototypes.shape[0]
    f = features.detach().float().contiguous()
    p = prototypes.detach().float().contiguous()
    if features.device.type == "cpu":
        out = torch.empty(n, k, dtype=torch.float32)
        if n:
            backends.module_for(features.device).prototype_probs(f.numpy(), p.numpy(), scale, out.numpy(), backends.cpu_threads())
        return out
    out = torch.empty(n, k, dtype=torch.float32, device=features.device)
    if n:
        _cuda().prototype_probs(f.data_ptr(), n, f.shape[1], p.data_ptr(), k, float(scale), out.data_ptr(),
                                 _cuda_stream(features.device), _cuda_index(features.device))
    return out
