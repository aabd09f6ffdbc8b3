"""Blocked similarity algorithms whose tile products run on the vendor GEMM (cuBLAS/cuBLASLt on a GPU,
so bf16/fp16 inputs use tensor cores with fp32 accumulation; MKL/oneDNN on a CPU).

The loss is never materialised as a full ``n x m`` matrix: rows are taken ``chunk`` at a time, the
``chunk x m`` tile of logits is produced by one GEMM (fp32 output), reduced to log-sum-exp statistics,
and recomputed in the backward from those O(n + m) statistics. Memory is O(chunk * m + (n + m) * d);
:func:`chunk_rows` picks ``chunk`` from a byte budget. Compared with the hand-written kernels
(``_core`` / ``_cuda``'s SIMT path) this trades one extra tile buffer for the vendor's GEMM speed; the
square loss takes both row and column statistics from one tile product, so its forward is one GEMM per
pair (the composite and the SIMT kernels need two) and its backward three.

See ``docs/kernels.md`` ("Tensor-core path").
"""

from __future__ import annotations

import functools
import os

import torch
from torch.autograd.function import once_differentiable

_HALF = (torch.bfloat16, torch.float16)


def tile_budget_bytes(device: torch.device) -> int:
    """Bytes one tile's temporaries may use (``GALAXALIGN_TILE_MB`` overrides): 2 GiB on a GPU, 256 MiB on a CPU."""
    env = os.environ.get("GALAXALIGN_TILE_MB")
    if env:
        return max(1, int(env)) << 20
    return (2 << 30) if device.type == "cuda" else (256 << 20)


def chunk_rows(n: int, m: int, device: torch.device, buffers: int = 4) -> int:
    """Rows per tile so that ``buffers`` fp32 ``chunk x m`` temporaries fit the tile budget (a multiple of 64)."""
    rows = tile_budget_bytes(device) // max(1, 4 * m * buffers)
    rows = max(64, min(32768, rows // 64 * 64))
    return int(min(n, rows))


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_supported(device_type: str) -> bool:
    """Whether ``torch.mm(half, half, out_dtype=torch.float32)`` (a bf16/fp16 GEMM with fp32 output) runs here."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def mm_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` with an fp32 (or fp64) result. bf16/fp16 inputs on a GPU go to a half GEMM with fp32
    output (tensor cores, fp32 accumulation); elsewhere half inputs are upcast first."""
    if x.dtype in _HALF:
        if _mm_out_dtype_supported(x.device.type):
            return torch.mm(x, y.to(x.dtype), out_dtype=torch.float32)
        return torch.mm(x.float(), y.float())
    return torch.mm(x, y.to(x.dtype))


def split_half(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``q`` as a sum of two fp16 parts ``hi + lo``: two fp16 tensor-core GEMMs against fp16 rows then give
    scores within ~2^-21 of fp32 queries' (one fp16 rounding of the queries would reorder near-ties)."""
    hi = q.half()
    return hi, (q - hi.float()).half()


def split_scores(hi: torch.Tensor, lo: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 scores ``(hi + lo) @ rows.T`` of :func:`split_half` queries against fp16 ``rows``."""
    scores = mm_f32(hi, rows.T)
    scores += mm_f32(lo, rows.T)
    return scores


def gemm_path(dtype: torch.dtype, device: torch.device) -> str:
    """How :func:`mm_f32` multiplies tiles of ``dtype`` on ``device`` (for logs and benchmarks)."""
    if dtype in _HALF:
        if _mm_out_dtype_supported(device.type):
            return f"{str(dtype).removeprefix('torch.')} GEMM, fp32 output (tensor cores)"
        return f"{str(dtype).removeprefix('torch.')} upcast to fp32 GEMM"
    if dtype == torch.float32 and device.type == "cuda":
        prec = torch.get_float32_matmul_precision()
        return f"fp32 GEMM (float32_matmul_precision={prec!r}: {'TF32 tensor cores' if prec != 'highest' else 'no tensor cores'})"
    return f"{str(dtype).removeprefix('torch.')} GEMM"


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _epilogue(x: torch.Tensor):
    """The ``_cuda`` module when its tile epilogue kernels serve ``x`` (fp32 statistics on a GPU), else None
    (torch ops do the epilogue: CPU tensors, fp64, or ``GALAXALIGN_CUDA_EPILOGUE=torch``)."""
    if x.device.type != "cuda" or _work_dtype(x) != torch.float32:
        return None
    if os.environ.get("GALAXALIGN_CUDA_EPILOGUE", "cuda").lower() == "torch":
        return None
    from galaxalign_batch.ops import backends

    mod = backends.module_for(x.device)
    return mod if mod is not None and hasattr(mod, "tile_grad") else None


def epilogue_path(x: torch.Tensor) -> str:
    """``cuda`` (one-pass tile kernels of ``_cuda``) or ``torch`` (torch ops): what the blocked path uses for ``x``."""
    return "cuda" if _epilogue(x) is not None else "torch"


def _launch(x: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.current_stream(x.device).cuda_stream, (x.device.index if x.device.index is not None
                                                             else torch.cuda.current_device())


# ------------------------------------------------------------------------------------------------
# Rectangular row log-sum-exp


class RowLogSumExp(torch.autograd.Function):
    """``lse[i] = logsumexp_j scale * a[i] . b[j]`` for ``a`` (n, d), ``b`` (m, d), blocked over rows of ``a``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n, m = a.shape[0], b.shape[0]
        wd = _work_dtype(a)
        s = scale.to(a.device, wd)
        out = torch.empty(n, dtype=wd, device=a.device)
        bt = b.T
        step = chunk_rows(n, m, a.device, buffers=2)
        mod = _epilogue(a)
        if mod is not None:
            s32 = s.reshape(1).contiguous()
            stream, dev = _launch(a)
        for i0 in range(0, n, step):
            if mod is not None:
                x = mm_f32(a[i0:i0 + step], bt).contiguous()
                mod.tile_row_lse(x.data_ptr(), x.shape[0], m, m, s32.data_ptr(), out[i0:].data_ptr(), stream, dev)
            else:
                out[i0:i0 + step] = torch.logsumexp(s * mm_f32(a[i0:i0 + step], bt).to(wd), dim=1)
        ctx.save_for_backward(a, b, scale, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b, scale, lse = ctx.saved_tensors
        n, m = a.shape[0], b.shape[0]
        wd = _work_dtype(a)
        s = scale.to(a.device, wd)
        grad = grad.to(wd)
        grad_a = torch.empty(a.shape, dtype=wd, device=a.device)
        grad_b = torch.zeros(b.shape, dtype=wd, device=a.device)
        grad_s = torch.zeros((), dtype=wd, device=a.device)
        bt = b.T
        gemm_dtype = a.dtype if a.dtype in _HALF else wd
        step = chunk_rows(n, m, a.device, buffers=3)
        mod = _epilogue(a)
        if mod is not None:
            s32 = s.reshape(1).contiguous()
            grad32 = grad.contiguous()
            one = torch.ones(1, dtype=torch.float32, device=a.device)
            gs = torch.zeros(1, dtype=torch.float32, device=a.device)
            gbuf = torch.empty((step, m), dtype=gemm_dtype, device=a.device)
            stream, dev = _launch(a)
            for i0 in range(0, n, step):
                ac = a[i0:i0 + step]
                x = mm_f32(ac, bt).contiguous()
                pg = gbuf[:x.shape[0]]
                mod.tile_grad(x.data_ptr(), x.shape[0], m, m, s32.data_ptr(), lse[i0:].data_ptr(), 0,
                              grad32[i0:].data_ptr(), one.data_ptr(), pg.data_ptr(), m, _DTYPE_CODES[gemm_dtype],
                              gs.data_ptr(), stream, dev)
                grad_a[i0:i0 + step] = s * mm_f32(pg, b)
                grad_b += s * mm_f32(pg.T, ac)
            grad_s = gs.reshape(())
            return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_s.to(scale.dtype).reshape(scale.shape)
        for i0 in range(0, n, step):
            ac = a[i0:i0 + step]
            x = mm_f32(ac, bt).to(wd)  # raw dot products
            p = torch.exp(s * x - lse[i0:i0 + step, None]).mul_(grad[i0:i0 + step, None])
            grad_s += (p * x).sum()
            pg = p.to(gemm_dtype)
            grad_a[i0:i0 + step] = s * mm_f32(pg, b)
            grad_b += s * mm_f32(pg.T, ac)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_s.to(scale.dtype).reshape(scale.shape)


def row_logsumexp(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Blocked ``logsumexp(scale * a @ b.T, dim=1)`` (arguments validated by :func:`galaxalign_batch.ops.row_logsumexp`)."""
    return RowLogSumExp.apply(a.contiguous(), b.contiguous(), scale)


# ------------------------------------------------------------------------------------------------
# Square pair statistics for the tri-modal loss


def pair_lse_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp (fp32, or fp64 for fp64 inputs) of ``scale * a @ b.T``, one GEMM per tile."""
    n = a.shape[0]
    wd = _work_dtype(a)
    s = scale.to(a.device, wd)
    lse_row = torch.empty(n, dtype=wd, device=a.device)
    lse_col = torch.full((b.shape[0],), float("-inf"), dtype=wd, device=a.device)
    bt = b.T
    step = chunk_rows(n, b.shape[0], a.device, buffers=2)
    mod = _epilogue(a)
    if mod is not None:  # one read of each tile for the rows, one for the columns
        m = b.shape[0]
        s32 = s.reshape(1).contiguous()
        segs = -(-step // 64)
        part = torch.empty((2, segs * m), dtype=torch.float32, device=a.device)
        stream, dev = _launch(a)
        for i0 in range(0, n, step):
            x = mm_f32(a[i0:i0 + step], bt).contiguous()
            mod.tile_row_lse(x.data_ptr(), x.shape[0], m, m, s32.data_ptr(), lse_row[i0:].data_ptr(), stream, dev)
            mod.tile_col_lse_update(x.data_ptr(), x.shape[0], m, m, s32.data_ptr(), lse_col.data_ptr(),
                                    part[0].data_ptr(), part[1].data_ptr(), stream, dev)
        return lse_row, lse_col
    for i0 in range(0, n, step):
        t = s * mm_f32(a[i0:i0 + step], bt).to(wd)
        lse_row[i0:i0 + step] = torch.logsumexp(t, dim=1)
        lse_col = torch.logaddexp(lse_col, torch.logsumexp(t, dim=0))
    return lse_row, lse_col


def pair_lse_backward_into(a, b, scale, lse_row, lse_col, coef: float, grad_a, grad_b) -> torch.Tensor:
    """Add the gradients of ``coef * (sum lse_row + sum lse_col)`` into ``grad_a``/``grad_b``; return d/dscale."""
    n = a.shape[0]
    wd = _work_dtype(a)
    s = scale.to(a.device, wd)
    gemm_dtype = a.dtype if a.dtype in _HALF else wd
    bt = b.T
    grad_s = torch.zeros((), dtype=wd, device=a.device)
    step = chunk_rows(n, b.shape[0], a.device, buffers=4)
    mod = _epilogue(a)
    if mod is not None:  # one read of each tile, G written once in the GEMM's input type
        m = b.shape[0]
        s32 = s.reshape(1).contiguous()
        coef32 = torch.full((1,), coef, dtype=torch.float32, device=a.device)
        gs = torch.zeros(1, dtype=torch.float32, device=a.device)
        gbuf = torch.empty((step, m), dtype=gemm_dtype, device=a.device)
        stream, dev = _launch(a)
        for i0 in range(0, n, step):
            ac = a[i0:i0 + step]
            x = mm_f32(ac, bt).contiguous()
            g = gbuf[:x.shape[0]]
            mod.tile_grad(x.data_ptr(), x.shape[0], m, m, s32.data_ptr(), lse_row[i0:].data_ptr(), lse_col.data_ptr(),
                          0, coef32.data_ptr(), g.data_ptr(), m, _DTYPE_CODES[gemm_dtype], gs.data_ptr(), stream, dev)
            del x
            grad_a[i0:i0 + step] += (s * mm_f32(g, b)).to(grad_a.dtype)
            grad_b += (s * mm_f32(g.T, ac)).to(grad_b.dtype)
        return gs.reshape(())
    for i0 in range(0, n, step):
        ac = a[i0:i0 + step]
        x = mm_f32(ac, bt).to(wd)
        t = s * x
        g = torch.exp(t - lse_row[i0:i0 + step, None]).add_(torch.exp(t.sub_(lse_col[None, :]))).mul_(coef)
        grad_s += (g * x).sum()
        del t, x
        gg = g.to(gemm_dtype)
        grad_a[i0:i0 + step] += (s * mm_f32(gg, b)).to(grad_a.dtype)
        grad_b += (s * mm_f32(gg.T, ac)).to(grad_b.dtype)
    return grad_s
