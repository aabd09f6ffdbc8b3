"""Flash-style GPU kernels (Triton): the loss statistics and the top-k pre-selection computed in the
epilogue of a tensor-core GEMM, so the ``n x m`` score matrix never reaches memory in fp32.

The ``tc`` path of :mod:`galaxalign_batch.ops.blocked` writes each fp32 tile of logits with one cuBLAS
call and reads it back with the next kernel (about 1 GiB per pass at B = 16,384); here the tile stays
in registers:

- loss forward (:func:`pair_lse_forward`): one kernel per pair computes each ``BM x BN`` logit tile
  (bf16/fp16 inputs, fp32 accumulation) and writes only its per-row and per-column (max, sum-exp)
  partials; torch combines the ``n / BN`` partials of a row into its log-sum-exp.
- loss backward (:func:`pair_lse_backward_into`): one kernel recomputes each tile and writes the softmax
  weights ``P_row + P_col`` (at most 2, so fp16 keeps its precision) in the input's half type, plus the
  tile's share of d/dscale; the two gradient products go to cuBLAS (tensor cores, fp32 output).
- rectangular row log-sum-exp (:func:`row_logsumexp`, global negatives across workers): the same kernels
  without the column terms.
- top-k (:func:`topk_update`): one kernel computes each ``BM x BN`` score tile and writes only the maximum
  of every segment of ``SEG`` consecutive rows (fp16 rows: the queries rounded once to fp16; fp32 rows:
  TF32). The top ``k`` rows lie in at most ``k`` segments, so the rows of the ``2 k`` best segments are
  re-scored exactly in fp32 and the best ``k`` kept. A bound on the pre-selection's rounding error
  (:func:`score_error_bound`) certifies the result per query: a query whose unselected segments could
  still hold a better row than its k-th is recomputed exactly, so the result is exact either way.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors in Triton's
interpreter (how CI tests them: ``tests/test_ops_flash.py``). fp32 loss inputs stay on the ``tc`` path.
See ``docs/kernels.md`` ("CUDA: three paths", ``flash``).
"""

from __future__ import annotations

import math
import os

import torch
from torch.autograd.function import once_differentiable

try:  # ships with torch's CUDA wheels; absent on some CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HALF = (torch.bfloat16, torch.float16)
SEG = 16  # rows per pre-selection segment of the top-k

__all__ = ["available", "why_unavailable", "pair_lse_forward", "pair_weights", "pair_lse_backward_into", "row_lse",
           "row_logsumexp", "topk_update", "segment_maxima", "rescore", "score_error_bound", "compile_kernels", "SEG"]


def why_unavailable(device: torch.device) -> str:
    """Empty when the flash kernels can run on ``device``, else the reason."""
    if triton is None:
        return "triton is not installed"
    if device.type == "cuda":
        return ""
    if device.type == "cpu" and INTERPRET:
        return ""
    return f"the flash kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), not on {device}"


def available(device: torch.device) -> bool:
    return not why_unavailable(device)


if triton is not None:

    @triton.jit
    def _grouped(pid, n_a, n_b, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
        """Tile (m, n) of program ``pid`` in grouped order: GROUP row tiles sweep the columns together (L2 reuse)."""
        tiles_m = tl.cdiv(n_a, BM)
        tiles_n = tl.cdiv(n_b, BN)
        per_group = GROUP * tiles_n
        first_m = (pid // per_group) * GROUP
        rows_here = tl.minimum(tiles_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % rows_here
        pid_n = (pid % per_group) // rows_here
        return pid_m, pid_n

    @triton.jit
    def _tile_dot(a_ptr, b_ptr, ra, rb, d, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """``a[ra] @ b[rb].T`` (fp32) for row indices ``ra`` (BM) and ``rb`` (BN) of two row-major (., d) matrices."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        a_rows = a_ptr + ra.to(tl.int64)[:, None] * d
        b_rows = b_ptr + rb.to(tl.int64)[:, None] * d
        for k0 in range(0, d, BK):
            rk = k0 + tl.arange(0, BK)
            if EVEN_K:
                x = tl.load(a_rows + rk[None, :])
                y = tl.load(b_rows + rk[None, :])
            else:
                x = tl.load(a_rows + rk[None, :], mask=rk[None, :] < d, other=0.0)
                y = tl.load(b_rows + rk[None, :], mask=rk[None, :] < d, other=0.0)
            if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly: fp32 there (exact for bf16 values)
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _pair_tile(a_ptr, b_ptr, scale_ptr, n_a, n_b, d, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
        """This program's tile of a pair: (tile row, tile column, row indices, column indices, raw dots, scale)."""
        pid_m, pid_n = _grouped(tl.program_id(0), n_a, n_b, BM, BN, GROUP)
        ra = pid_m * BM + tl.arange(0, BM)
        rb = pid_n * BN + tl.arange(0, BN)
        x = _tile_dot(a_ptr, b_ptr, ra % n_a, rb % n_b, d, BM, BN, BK, EVEN_K, UPCAST, "ieee")
        return pid_m, pid_n, ra, rb, x, tl.load(scale_ptr)

    @triton.jit
    def _pair_stats_kernel(a_ptr, b_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr, n_a, n_b, d,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                           EVEN_K: tl.constexpr, UPCAST: tl.constexpr, COLS: tl.constexpr):
        """Per tile of ``s * a @ b.T``: each row's (max, sum-exp) over the tile's columns -> row_*[row, tile_n];
        with COLS, each column's over the tile's rows -> col_*[tile_m, column]. Max in log2 units."""
        pid_m, pid_n, ra, rb, x, s = _pair_tile(a_ptr, b_ptr, scale_ptr, n_a, n_b, d, BM, BN, BK, GROUP, EVEN_K, UPCAST)
        ok_a = ra < n_a
        ok_b = rb < n_b
        t = tl.where(ok_a[:, None] & ok_b[None, :], x * (s * 1.4426950408889634), -1.0e30)
        r_max = tl.max(t, axis=1)
        r_sum = tl.sum(tl.exp2(t - r_max[:, None]), axis=1)
        n_tiles_b = tl.cdiv(n_b, BN)
        tl.store(row_m_ptr + ra.to(tl.int64) * n_tiles_b + pid_n, r_max, mask=ok_a)
        tl.store(row_l_ptr + ra.to(tl.int64) * n_tiles_b + pid_n, r_sum, mask=ok_a)
        if COLS:
            c_max = tl.max(t, axis=0)
            c_sum = tl.sum(tl.exp2(t - c_max[None, :]), axis=0)
            tl.store(col_m_ptr + pid_m.to(tl.int64) * n_b + rb, c_max, mask=ok_b)
            tl.store(col_l_ptr + pid_m.to(tl.int64) * n_b + rb, c_sum, mask=ok_b)

    @triton.jit
    def _pair_grad_kernel(a_ptr, b_ptr, scale_ptr, lse_row_ptr, lse_col_ptr, w_row_ptr, p_ptr, gs_ptr, n_a, n_b, d,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                          EVEN_K: tl.constexpr, UPCAST: tl.constexpr, COLS: tl.constexpr):
        """Per tile: ``P = exp(s x - lse_row) + exp(s x - lse_col)`` (COLS) or ``w_row * exp(s x - lse_row)``
        -> p[row, col] (p's dtype); sum(P * x) -> gs[tile]."""
        pid_m, pid_n, ra, rb, x, s = _pair_tile(a_ptr, b_ptr, scale_ptr, n_a, n_b, d, BM, BN, BK, GROUP, EVEN_K, UPCAST)
        ok_a = ra < n_a
        ok_b = rb < n_b
        lr = tl.load(lse_row_ptr + ra, mask=ok_a, other=0.0)
        t = x * (s * 1.4426950408889634)
        p = tl.exp2(t - (lr * 1.4426950408889634)[:, None])
        if COLS:
            lc = tl.load(lse_col_ptr + rb, mask=ok_b, other=0.0)
            p += tl.exp2(t - (lc * 1.4426950408889634)[None, :])
        else:
            p *= tl.load(w_row_ptr + ra, mask=ok_a, other=0.0)[:, None]
        ok = ok_a[:, None] & ok_b[None, :]
        p = tl.where(ok, p, 0.0)
        tl.store(p_ptr + ra.to(tl.int64)[:, None] * n_b + rb[None, :], p.to(p_ptr.dtype.element_ty), mask=ok)
        tl.store(gs_ptr + tl.program_id(0), tl.sum(tl.sum(p * x, axis=1), axis=0))

    @triton.jit
    def _segment_max_kernel(q_ptr, x_ptr, out_ptr, n_q, m, d, n_seg,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEG_: tl.constexpr,
                            EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """Per tile of ``q @ x.T``: the maximum over every ``SEG_`` consecutive rows of x -> out[query, segment].
        Query blocks vary fastest, so the programs sharing a tile of x run together (x is read once from HBM)."""
        n_tiles_q = tl.cdiv(n_q, BM)
        pid_m = tl.program_id(0) % n_tiles_q
        pid_n = tl.program_id(0) // n_tiles_q
        rq = pid_m * BM + tl.arange(0, BM)
        rx = pid_n * BN + tl.arange(0, BN)
        s = _tile_dot(q_ptr, x_ptr, rq % n_q, rx % m, d, BM, BN, BK, EVEN_K, UPCAST, PRECISION)
        s = tl.where((rx < m)[None, :], s, float("-inf"))
        seg_max = tl.max(tl.reshape(s, (BM, BN // SEG_, SEG_)), axis=2)
        rs = pid_n * (BN // SEG_) + tl.arange(0, BN // SEG_)
        ok = (rq < n_q)[:, None] & (rs < n_seg)[None, :]
        tl.store(out_ptr + rq.to(tl.int64)[:, None] * n_seg + rs[None, :], seg_max, mask=ok)

    @triton.jit
    def _rescore_kernel(q_ptr, x_ptr, idx_ptr, out_ptr, c, d, BC: tl.constexpr, BK: tl.constexpr):
        """``out[i, j] = q[i] . x[idx[i, j]]`` in fp32 for a (n, c) table of candidate rows."""
        i = tl.program_id(0)
        rc = tl.program_id(1) * BC + tl.arange(0, BC)
        ok = rc < c
        rows = tl.load(idx_ptr + i.to(tl.int64) * c + rc, mask=ok, other=0)
        acc = tl.zeros((BC,), dtype=tl.float32)
        for k0 in range(0, d, BK):
            rk = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + rows[:, None] * d + rk[None, :], mask=ok[:, None] & (rk[None, :] < d), other=0.0)
            qv = tl.load(q_ptr + i.to(tl.int64) * d + rk, mask=rk < d, other=0.0)
            acc += tl.sum(xv.to(tl.float32) * qv[None, :], axis=1)
        tl.store(out_ptr + i.to(tl.int64) * c + rc, acc, mask=ok)


def _config(kernel: str, d: int, dtype: torch.dtype, gpu: bool = not INTERPRET, tiles: dict | None = None) -> tuple[dict, dict]:
    """``(constexprs, launch options)`` of ``kernel`` (pair_stats, pair_grad, segment_max, rescore) for feature
    size ``d`` and input ``dtype``. GPU: 128 x 128 tiles, K steps of 64 (32 for TF32, whose tiles are twice the
    bytes), pipelined in 3-4 stages; the interpreter takes 32 x 32 tiles (speed). ``tiles`` overrides any of
    BM, BN, BK, GROUP, num_warps, num_stages (``bench/flash_kernels.py`` sweeps them)."""
    consts, options = _default_config(kernel, d, dtype, gpu)
    for key, value in (tiles or {}).items():
        if key in ("num_warps", "num_stages"):
            options[key] = int(value)
        elif key in consts and key in ("BM", "BN", "BK", "GROUP", "BC"):
            consts[key] = int(value)
        else:
            raise ValueError(f"flash kernel {kernel!r}: cannot override {key!r}")
    if "EVEN_K" in consts:
        consts["EVEN_K"] = d % consts["BK"] == 0
    if kernel == "segment_max" and consts["BN"] % SEG:
        raise ValueError(f"segment_max: BN={consts['BN']} is not a multiple of the segment size {SEG}")
    return consts, options


def _default_config(kernel: str, d: int, dtype: torch.dtype, gpu: bool) -> tuple[dict, dict]:
    if kernel == "rescore":
        return dict(BC=64, BK=64) if gpu else dict(BC=32, BK=64), (dict(num_warps=4) if gpu else {})
    bk = (32 if dtype == torch.float32 else 64) if gpu else (32 if d >= 32 else 16)
    consts = dict(BM=128, BN=128, BK=bk) if gpu else dict(BM=32, BN=32, BK=bk)
    consts.update(EVEN_K=d % bk == 0, UPCAST=not gpu)
    options = dict(num_warps=8, num_stages=3) if gpu else {}
    if kernel in ("pair_stats", "pair_grad"):
        consts["GROUP"] = 8 if gpu else 2
    elif kernel == "segment_max":
        consts.update(SEG_=SEG, PRECISION="tf32" if dtype == torch.float32 else "ieee")
        if gpu and dtype != torch.float32:
            options["num_stages"] = 4
    else:
        raise ValueError(f"unknown flash kernel {kernel!r}")
    return consts, options


def _check(a: torch.Tensor, what: str) -> None:
    reason = why_unavailable(a.device)
    if reason:
        raise RuntimeError(f"flash {what}: {reason}")
    if a.dtype not in HALF:
        raise TypeError(f"flash {what}: bfloat16/float16 inputs only, got {a.dtype} (fp32 stays on the tc path)")


def _combine(m2: torch.Tensor, l: torch.Tensor, dim: int) -> torch.Tensor:
    """Log-sum-exp (natural units) from partial (max in log2 units, sum of exp2 below it) along ``dim``."""
    top = m2.amax(dim=dim, keepdim=True)
    total = (l * torch.exp2(m2 - top)).sum(dim=dim)
    return (top.squeeze(dim) + torch.log2(total)) * math.log(2.0)


def _stats(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, cols: bool, tiles: dict | None, what: str):
    """One pass of the statistics kernel: row (and with ``cols`` column) log-sum-exp, fp32."""
    _check(a, what)
    a, b = a.contiguous(), b.to(a.dtype).contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    cfg, opts = _config("pair_stats", d, a.dtype, tiles=tiles)
    tiles_m, tiles_n = triton.cdiv(n, cfg["BM"]), triton.cdiv(m, cfg["BN"])
    f32 = dict(dtype=torch.float32, device=a.device)
    row_m, row_l = torch.empty((n, tiles_n), **f32), torch.empty((n, tiles_n), **f32)
    col_m, col_l = (torch.empty((tiles_m, m), **f32), torch.empty((tiles_m, m), **f32)) if cols else (row_m, row_l)
    s = scale.to(a.device, torch.float32).reshape(1).contiguous()
    _pair_stats_kernel[(tiles_m * tiles_n,)](a, b, s, row_m, row_l, col_m, col_l, n, m, d, COLS=cols, **cfg, **opts)
    lse_row = _combine(row_m, row_l, 1)
    return (lse_row, _combine(col_m, col_l, 0)) if cols else lse_row


def pair_lse_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, tiles: dict | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp (fp32) of ``scale * a @ b.T`` for half ``a`` (n, d) and ``b`` (m, d)."""
    return _stats(a, b, scale, True, tiles, "pair_lse_forward")


def row_lse(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, tiles: dict | None = None) -> torch.Tensor:
    """Row log-sum-exp (fp32) of ``scale * a @ b.T`` for half ``a`` (n, d) and ``b`` (m, d), ``n != m`` allowed."""
    return _stats(a, b, scale, False, tiles, "row_lse")


def _grad_rows(n: int, m: int, device: torch.device) -> int:
    """Rows of ``a`` per backward chunk: the half ``rows x m`` weight matrix within the tile budget."""
    from galaxalign_batch.ops.blocked import tile_budget_bytes

    rows = tile_budget_bytes(device) // max(1, 2 * m)
    return int(min(n, max(128, rows // 128 * 128)))


def pair_weights(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, lse_row: torch.Tensor,
                 lse_col: torch.Tensor | None, out: torch.Tensor, *, row_weights: torch.Tensor | None = None,
                 tiles: dict | None = None) -> torch.Tensor:
    """``out = exp(s a b.T - lse_row) + exp(s a b.T - lse_col)`` (out: (n, m), the inputs' half type) from one
    flash kernel, or with ``lse_col=None`` ``out = row_weights * exp(s a b.T - lse_row)`` (weights in [-1, 1]);
    returns ``sum(out * a b.T)`` (fp32 scalar tensor), the scale's share before the caller's factor."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    cols = lse_col is not None
    if cols == (row_weights is not None):
        raise ValueError("pair_weights: give lse_col (square loss) or row_weights (row log-sum-exp), not both")
    cfg, opts = _config("pair_grad", d, a.dtype, tiles=tiles)
    s32 = scale.to(a.device, torch.float32).reshape(1).contiguous()
    grid = triton.cdiv(n, cfg["BM"]) * triton.cdiv(m, cfg["BN"])
    gs = torch.empty(grid, dtype=torch.float32, device=a.device)
    other = lse_col if cols else row_weights.float().contiguous()
    _pair_grad_kernel[(grid,)](a, b, s32, lse_row, other, other, out, gs, n, m, d, COLS=cols, **cfg, **opts)
    return gs.sum()


def pair_lse_backward_into(a, b, scale, lse_row, lse_col, coef: float, grad_a, grad_b) -> torch.Tensor:
    """Add the gradients of ``coef * (sum lse_row + sum lse_col)`` into ``grad_a``/``grad_b`` (fp32); return d/dscale.

    ``P = exp(s x - lse_row) + exp(s x - lse_col)`` for each chunk of rows comes from one flash kernel
    (:func:`pair_weights`, in the inputs' half type); ``grad_a += coef s P @ b`` and ``grad_b += coef s P.T @ a``
    from cuBLAS.
    """
    _check(a, "pair_lse_backward_into")
    lse_col = lse_col.float().contiguous()
    return coef * _weighted_products(a, b, scale, lse_row, coef * float(scale), grad_a, grad_b, lse_col=lse_col)


def _weighted_products(a, b, scale, lse_row, factor: float, grad_a, grad_b, *, lse_col=None, row_weights=None):
    """For each chunk of rows of ``a``: the weights ``P`` of :func:`pair_weights` (one kernel, half type), then
    ``grad_a += factor P @ b`` and ``grad_b += factor P.T @ a`` (cuBLAS). Returns ``sum(P * a b.T)`` (fp32)."""
    from galaxalign_batch.ops.blocked import mm_f32

    a, b = a.contiguous(), b.to(a.dtype).contiguous()
    n, m = a.shape[0], b.shape[0]
    lse_row = lse_row.float().contiguous()
    step = _grad_rows(n, m, a.device)
    buf = torch.empty((step, m), dtype=a.dtype, device=a.device)
    total = torch.zeros((), dtype=torch.float32, device=a.device)
    for i0 in range(0, n, step):
        rows = min(step, n - i0)
        ac, p = a[i0:i0 + rows], buf[:rows]
        w = None if row_weights is None else row_weights[i0:i0 + rows]
        total += pair_weights(ac, b, scale, lse_row[i0:i0 + rows], lse_col, p, row_weights=w)
        grad_a[i0:i0 + rows] += factor * mm_f32(p, b)
        grad_b += factor * mm_f32(p.T, ac)
    return total


class RowLogSumExp(torch.autograd.Function):
    """``lse[i] = logsumexp_j scale * a[i] . b[j]`` on the flash kernels, for half ``a`` (n, d), ``b`` (m, d).

    Backward per chunk of rows: ``P = w_i softmax_ij`` with ``w = grad / max|grad|`` (so ``P`` fits the half
    type) from one kernel, then ``grad_a = s max|grad| P b`` and ``grad_b = s max|grad| P.T a`` from cuBLAS.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        lse = row_lse(a, b, scale)
        ctx.save_for_backward(a, b, scale, lse)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b, scale, lse = ctx.saved_tensors
        grad = grad.float()
        top = float(grad.abs().amax())
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=a.device)
        grad_s = torch.zeros((), dtype=torch.float32, device=a.device)
        if top != 0:  # (a NaN gradient propagates)
            w = (grad / top).contiguous()
            grad_s = top * _weighted_products(a, b, scale, lse, top * float(scale), grad_a, grad_b, row_weights=w)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_s.to(scale.dtype).reshape(scale.shape)


def row_logsumexp(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Differentiable row log-sum-exp on the flash kernels (what :func:`galaxalign_batch.ops.row_logsumexp`
    runs for CUDA half inputs with ``GALAXALIGN_CUDA_LOSS=flash``)."""
    _check(a, "row_logsumexp")
    return RowLogSumExp.apply(a.contiguous(), b.to(a.dtype).contiguous(), scale)


# ------------------------------------------------------------------------------------------------
# Top-k


def score_error_bound(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per query, a bound on ``|pre-selection score - q . x|`` over the rows of ``rows`` (fp32, shape (n,)).

    fp16 rows: the query is rounded once to fp16 (relative error <= 2^-11 per element, <= 2^-25 absolute
    below fp16's normal range); fp32 rows: TF32 rounds both operands (<= 2^-10 each, either rounding mode).
    fp32 accumulation of ``d`` products adds at most ``d 2^-23`` of ``|q| |x|`` (doubled for safety).
    """
    d = queries.shape[1]
    q_norm = torch.linalg.vector_norm(queries.float(), dim=1)
    x_norm = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).amax()
    if rows.dtype == torch.float16:
        rel, absolute = 2.0 ** -11, 2.0 ** -25 * math.sqrt(d)
    else:
        rel, absolute = 2.0 ** -9, 0.0
    return x_norm * (q_norm * (rel + d * 2.0 ** -22) + absolute)


def segment_maxima(queries: torch.Tensor, rows: torch.Tensor, *, tiles: dict | None = None) -> torch.Tensor:
    """``max`` of ``queries @ rows.T`` over each segment of :data:`SEG` rows, (n, ceil(m / SEG)) fp32 (pre-selection
    precision: fp16 queries against fp16 rows, TF32 against fp32 rows)."""
    n, d = queries.shape
    m = rows.shape[0]
    cfg, opts = _config("segment_max", d, rows.dtype, tiles=tiles)
    q = queries.to(rows.dtype).contiguous()
    n_seg = triton.cdiv(m, SEG)
    out = torch.empty((n, n_seg), dtype=torch.float32, device=rows.device)
    grid = (triton.cdiv(n, cfg["BM"]) * triton.cdiv(m, cfg["BN"]),)
    _segment_max_kernel[grid](q, rows, out, n, m, d, n_seg, **cfg, **opts)
    return out


def rescore(queries: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``queries[i] . rows[index[i, j]]`` in fp32 for an (n, c) int64 ``index``."""
    n, c = index.shape
    out = torch.empty((n, c), dtype=torch.float32, device=rows.device)
    q = queries.float().contiguous()
    cfg, opts = _config("rescore", q.shape[1], rows.dtype)
    _rescore_kernel[(n, triton.cdiv(c, cfg["BC"]))](q, rows, index.contiguous(), out, c, q.shape[1], **cfg, **opts)
    return out


def fits_fp16(queries: torch.Tensor) -> bool:
    """Whether ``queries`` lie within half of fp16's range, as the pre-selection against fp16 rows needs."""
    return bool(queries.abs().amax() < torch.finfo(torch.float16).max / 2)


def _exact_topk(q: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of fp32 ``q @ rows.T`` (ties by lower index), a few queries at a time within the tile budget.
    fp16 rows: the queries as hi + lo fp16 parts through two GEMMs with fp32 output (as the ``tc`` path)."""
    from galaxalign_batch.ops.blocked import split_half, split_scores, tile_budget_bytes

    step = max(1, min(q.shape[0], tile_budget_bytes(rows.device) // max(1, 16 * rows.shape[0])))  # scores + sort
    out_s, out_i = [], []
    for q0 in range(0, q.shape[0], step):
        qc = q[q0:q0 + step]
        if rows.dtype == torch.float16:
            scores = split_scores(*split_half(qc), rows)
        else:
            scores = qc @ rows.T
        top = torch.sort(scores, dim=1, descending=True, stable=True)
        out_s.append(top.values[:, :k])
        out_i.append(top.indices[:, :k])
    return torch.cat(out_s), torch.cat(out_i)


def topk_update(queries: torch.Tensor, rows: torch.Tensor, start: int, k: int,
                best_s: torch.Tensor, best_i: torch.Tensor) -> int:
    """Merge the exact top-``k`` of ``queries @ rows.T`` (row indices offset by ``start``) into the running
    ``best_s``/``best_i`` (n, k), in place; ties by lower index. Returns how many queries needed the exact
    fallback (their pre-selection could not be certified).

    ``queries`` fp32 (n, d); ``rows`` fp16 or fp32 (m, d), contiguous, on the queries' device. With fp16 rows
    the queries must lie within half of fp16's range (they are rounded to fp16 for the pre-selection).
    """
    from galaxalign_batch.ops.reference import merge_topk

    n = queries.shape[0]
    m = rows.shape[0]
    q = queries.float().contiguous()
    if rows.dtype == torch.float16 and not fits_fp16(q):
        raise ValueError("flash topk_update: queries beyond half of fp16's range cannot be pre-selected against "
                         "fp16 rows (the tc path serves them)")
    seg = segment_maxima(q, rows)
    n_seg = seg.shape[1]
    kp = min(n_seg, max(2 * k, 4))
    sel_v, sel = torch.topk(seg, kp, dim=1, sorted=False)
    segments = torch.sort(sel, dim=1).values
    cand = (segments[:, :, None] * SEG + torch.arange(SEG, device=rows.device)).reshape(n, kp * SEG)
    valid = cand < m
    cand = torch.where(valid, cand, torch.zeros_like(cand))
    scores = rescore(q, rows, cand).masked_fill_(~valid, float("-inf"))
    k_here = min(k, m)
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    cs, ci = order.values[:, :k_here], torch.gather(cand, 1, order.indices[:, :k_here])
    fallback = 0
    if kp < n_seg:
        # every unselected segment's approximate maximum is <= the smallest selected one
        bound = sel_v.amin(dim=1) + score_error_bound(q, rows)
        kth = cs[:, k - 1] if k_here == k else torch.full((n,), float("-inf"), device=rows.device)
        kth = torch.maximum(kth, best_s[:, k - 1])
        unsure = (bound >= kth).nonzero().flatten()
        fallback = int(unsure.numel())
        if fallback:
            cs[unsure], ci[unsure] = _exact_topk(q[unsure], rows, k_here)
    s, i = merge_topk(best_s, best_i, cs, ci + start, k)
    best_s.copy_(s)
    best_i.copy_(i)
    return fallback


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): what the kernels lower to


def _with(config: tuple[dict, dict], **consts) -> tuple[dict, dict]:
    return dict(config[0], **consts), config[1]


def _kernel_specs(half: str = "bf16", d: int = 512) -> dict:
    """Per kernel: the function, its signature, the GPU launch's constexprs and options (:func:`_config`) and the
    arguments a launch with ``d`` = 512 and aligned buffers specialises as 16-divisible."""
    f32, h = "*fp32", f"*{half}"
    hdt = torch.bfloat16 if half == "bf16" else torch.float16
    pair = dict(a_ptr=h, b_ptr=h, scale_ptr=f32)
    seg = dict(out_ptr=f32, n_q="i32", m="i32", d="i32", n_seg="i32")
    return {
        **{f"pair_stats{suffix}": (_pair_stats_kernel, dict(pair, row_m_ptr=f32, row_l_ptr=f32, col_m_ptr=f32,
                                                             col_l_ptr=f32, n_a="i32", n_b="i32", d="i32"),
                                    _with(_config("pair_stats", d, hdt, gpu=True), COLS=cols), (0, 1, 3, 4, 5, 6, 9))
           for suffix, cols in (("", True), ("_rows", False))},
        **{f"pair_grad{suffix}": (_pair_grad_kernel, dict(pair, lse_row_ptr=f32, lse_col_ptr=f32, w_row_ptr=f32, p_ptr=h,
                                                           gs_ptr=f32, n_a="i32", n_b="i32", d="i32"),
                                   _with(_config("pair_grad", d, hdt, gpu=True), COLS=cols), (0, 1, 3, 4, 5, 6, 7, 10))
           for suffix, cols in (("", True), ("_rows", False))},
        "segment_max_fp16": (_segment_max_kernel, dict(q_ptr="*fp16", x_ptr="*fp16", **seg),
                             _config("segment_max", d, torch.float16, gpu=True), (0, 1, 2, 5)),
        "segment_max_tf32": (_segment_max_kernel, dict(q_ptr=f32, x_ptr=f32, **seg),
                             _config("segment_max", d, torch.float32, gpu=True), (0, 1, 2, 5)),
        "rescore": (_rescore_kernel, dict(q_ptr=f32, x_ptr="*fp16", idx_ptr="*i64", out_ptr=f32, c="i32", d="i32"),
                    _config("rescore", d, torch.float16, gpu=True), (0, 1, 2, 3, 5)),
    }


def compile_kernels(arch: int = 90, half: str = "bf16") -> dict[str, dict]:
    """Compile every flash kernel for CUDA compute capability ``arch`` (e.g. 80, 90) without a GPU; per kernel
    its shared memory and how many tensor-core (``wgmma``/``mma``) and asynchronous-copy instructions the PTX has."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = {}
    for name, (fn, sig, (consts, options), aligned) in _kernel_specs(half).items():
        sig = dict(sig, **{key: "constexpr" for key in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=options)
        ptx = kernel.asm["ptx"]
        report[name] = {
            "shared_bytes": int(kernel.metadata.shared),
            "tensor_core_ops": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\S*", ptx)),
            "async_copies": len(re.findall(r"\bcp\.async\.(?:cg|ca|bulk)\S*", ptx)),
        }
    return report
