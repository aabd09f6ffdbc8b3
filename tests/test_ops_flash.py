"""The flash kernels (galaxalign_batch/ops/flash.py, Triton) against float64 references.

Without a GPU, Triton's interpreter runs the very same kernels on CPU tensors. It is switched on by
``TRITON_INTERPRET=1`` when the kernels are decorated (at import), so ``test_cases_in_the_interpreter``
runs this module's cases in a child pytest process with that setting. The kernels are also compiled ahead
of time for sm_80 and sm_90 (no GPU needed) to check they lower to tensor-core and asynchronous-copy code.
On a machine with a GPU the cases run compiled, on CUDA tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from galaxalign_batch.ops import flash  # noqa: E402

INTERPRETED = flash.INTERPRET
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
cases = pytest.mark.skipif(not (INTERPRETED or ON_GPU),
                           reason="run in Triton's interpreter by test_cases_in_the_interpreter (or on a GPU)")


@pytest.mark.skipif(INTERPRETED or ON_GPU, reason="this process runs the cases itself")
def test_cases_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
                           __file__], env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-8000:] + proc.stderr[-3000:]
    if proc.returncode and "only 0-dimensional arrays can be converted to Python scalars" in proc.stdout:
        import numpy as np  # older Triton interpreters call int() on 1-element arrays, which NumPy >= 2.4 refuses
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run under NumPy {np.__version__} "
                    "(int() of a 1-element array); Triton >= 3.8 or NumPy < 2.4 runs these cases")
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


@pytest.mark.skipif(INTERPRETED or ON_GPU, reason="the ahead-of-time check runs where the kernels are not interpreted")
@pytest.mark.parametrize("arch,op", [(90, "wgmma"), (80, "mma.sync")])
def test_kernels_compile_to_tensor_cores(arch, op):
    report = flash.compile_kernels(arch)
    assert set(report) == {"pair_stats", "pair_grad", "pair_stats_rows", "pair_grad_rows", "segment_max_fp16",
                           "segment_max_tf32", "rescore"}
    for name, r in report.items():
        if name == "rescore":  # a gather and fp32 dot products on CUDA cores
            continue
        assert r["tensor_core_ops"] > 0, (name, r)
        assert r["async_copies"] > 0, (name, r)  # the K loop is pipelined (cp.async)
        assert r["shared_bytes"] <= (227 if arch == 90 else 163) * 1024, (name, r)


def test_unavailable_reason_is_clear():
    if INTERPRETED:
        assert flash.why_unavailable(torch.device("cpu")) == ""
    else:
        assert "CUDA tensors" in flash.why_unavailable(torch.device("cpu"))
    with pytest.raises((RuntimeError, TypeError)):
        flash.pair_lse_forward(torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------
# Loss statistics


def _pair(n, m, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    b = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return a, b


def _reference(a, b, scale, coef):
    """float64 lse_row, lse_col and the gradients of coef * (sum lse_row + sum lse_col) from the half values."""
    x = a.double().requires_grad_()
    y = b.double().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    t = s * x @ y.T
    lr, lc = t.logsumexp(1), t.logsumexp(0)
    (coef * (lr.sum() + lc.sum())).backward()
    return lr.detach(), lc.detach(), x.grad, y.grad, s.grad


@cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d", [(70, 90, 40), (64, 64, 64), (1, 5, 16), (200, 33, 96)])
def test_pair_statistics_and_gradients(n, m, d, dtype):
    a, b = _pair(n, m, d, dtype, seed=n + m)
    scale, coef = 14.0, 0.3
    ref = _reference(a, b, scale, coef)
    a_, b_ = a.to(DEVICE), b.to(DEVICE)
    s = torch.tensor(scale, device=DEVICE)
    lse_row, lse_col = flash.pair_lse_forward(a_, b_, s)
    torch.testing.assert_close(lse_row.double().cpu(), ref[0], rtol=0, atol=2e-5)  # fp32 accumulation and exp2
    torch.testing.assert_close(lse_col.double().cpu(), ref[1], rtol=0, atol=2e-5)
    grad_a = torch.zeros(n, d, device=DEVICE)
    grad_b = torch.zeros(m, d, device=DEVICE)
    grad_s = flash.pair_lse_backward_into(a_, b_, s, lse_row, lse_col, coef, grad_a, grad_b)
    # the softmax weights (<= 2) enter the gradient GEMMs in the input's half type: 2^-9 (bf16) or 2^-12 (fp16)
    # relative, so elements that cancel to near 0 carry an absolute error of that order of the gradient's scale
    tol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    for got, want in ((grad_a, ref[2]), (grad_b, ref[3])):
        size = float(want.abs().max())
        torch.testing.assert_close(got.double().cpu(), want, rtol=3e-2, atol=tol * size)
    assert float(grad_s) == pytest.approx(float(ref[4]), rel=1e-4, abs=1e-5)


@cases
def test_pair_gradients_over_several_row_chunks(monkeypatch):
    """The backward's weight matrix in chunks of rows (a 1 MiB budget: 128-row chunks of 300 x 2200)."""
    monkeypatch.setenv("GALAXALIGN_TILE_MB", "1")
    a, b = _pair(300, 2200, 32, torch.bfloat16, seed=7)
    ref = _reference(a, b, 20.0, 0.5)
    s = torch.tensor(20.0, device=DEVICE)
    a_, b_ = a.to(DEVICE), b.to(DEVICE)
    assert flash._grad_rows(300, 2200, a_.device) == 128
    lse_row, lse_col = flash.pair_lse_forward(a_, b_, s)
    grad_a, grad_b = torch.zeros(300, 32, device=DEVICE), torch.zeros(2200, 32, device=DEVICE)
    grad_s = flash.pair_lse_backward_into(a_, b_, s, lse_row, lse_col, 0.5, grad_a, grad_b)
    for got, want in ((grad_a, ref[2]), (grad_b, ref[3])):
        torch.testing.assert_close(got.double().cpu(), want, rtol=3e-2, atol=4e-3 * float(want.abs().max()))
    assert float(grad_s) == pytest.approx(float(ref[4]), rel=1e-4)


@cases
def test_pair_statistics_at_an_extreme_scale():
    """scale 1e4 on nearly equal features: logits of 1e4 whose differences are tiny; no overflow or NaN."""
    g = torch.Generator().manual_seed(9)
    base = F.normalize(torch.randn(1, 16, generator=g, dtype=torch.float64), dim=1)
    a = F.normalize(base + 1e-3 * torch.randn(70, 16, generator=g, dtype=torch.float64), dim=1).to(torch.bfloat16)
    b = F.normalize(base + 1e-3 * torch.randn(70, 16, generator=g, dtype=torch.float64), dim=1).to(torch.bfloat16)
    ref = _reference(a, b, 1e4, 1.0 / 140)
    s = torch.tensor(1e4, device=DEVICE)
    lse_row, lse_col = flash.pair_lse_forward(a.to(DEVICE), b.to(DEVICE), s)
    torch.testing.assert_close(lse_row.double().cpu(), ref[0], rtol=1e-6, atol=0.05)  # fp32 logits of 1e4: ulp 1e-3
    grad_a, grad_b = torch.zeros(70, 16, device=DEVICE), torch.zeros(70, 16, device=DEVICE)
    flash.pair_lse_backward_into(a.to(DEVICE), b.to(DEVICE), s, lse_row, lse_col, 1.0 / 140, grad_a, grad_b)
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()


# ------------------------------------------------------------------------------------------------
# Top-k


def _topk_in_chunks(q, mat, k, chunk):
    best_s = torch.full((q.shape[0], k), -float("inf"), device=DEVICE)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=DEVICE)
    fallbacks = 0
    for start in range(0, mat.shape[0], chunk):
        rows = mat[start:start + chunk].to(DEVICE).contiguous()
        fallbacks += flash.topk_update(q.to(DEVICE), rows, start, k, best_s, best_i)
    return best_s.cpu(), best_i.cpu(), fallbacks


@cases
@pytest.mark.parametrize("low,high", [(-3, 4), (0, 2)])
@pytest.mark.parametrize("fp16", [False, True])
def test_topk_exact_on_integer_data(fp16, low, high):
    """Small integers: every score is exact in fp16/TF32 and fp32, with many ties (ordered by lower row index).
    With 0/1 entries the best unselected segments tie with a query's k-th score: no certificate, and those
    queries take the exact fallback."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(low, high, (40, 20), generator=g).float()
    mat = torch.randint(low, high, (4000, 20), generator=g).float()
    order = torch.sort(q @ mat.T, dim=1, descending=True, stable=True)
    s, i, fallbacks = _topk_in_chunks(q, mat.half() if fp16 else mat, 25, chunk=2000)
    assert torch.equal(s, order.values[:, :25])
    assert torch.equal(i, order.indices[:, :25])
    if low == 0:
        assert fallbacks > 0


@cases
@pytest.mark.parametrize("fp16", [False, True])
def test_topk_random_rows_are_certified(fp16):
    """Normalised random rows: the pre-selection is certified for (nearly) every query and the result is exact."""
    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(37, 48, generator=g), dim=1)
    mat = F.normalize(torch.randn(3000, 48, generator=g), dim=1)
    mat = mat.half() if fp16 else mat
    order = torch.sort(q @ mat.float().T, dim=1, descending=True, stable=True)
    s, i, fallbacks = _topk_in_chunks(q, mat, 7, chunk=1024)
    assert torch.equal(i, order.indices[:, :7])
    torch.testing.assert_close(s, order.values[:, :7], rtol=0, atol=1e-6)
    assert fallbacks <= 2


@cases
def test_topk_fallback_when_the_bound_is_loose(monkeypatch):
    """A bound too loose to certify anything sends every query to the exact path: the same answer."""
    monkeypatch.setattr(flash, "score_error_bound", lambda q, rows: torch.full((q.shape[0],), 10.0, device=rows.device))
    g = torch.Generator().manual_seed(6)
    q = F.normalize(torch.randn(9, 32, generator=g), dim=1)
    mat = F.normalize(torch.randn(900, 32, generator=g), dim=1).half()
    order = torch.sort(q @ mat.float().T, dim=1, descending=True, stable=True)
    s, i, fallbacks = _topk_in_chunks(q, mat, 5, chunk=900)
    assert fallbacks == 9
    assert torch.equal(i, order.indices[:, :5])


@cases
def test_topk_chunks_smaller_than_k():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(6, 16, generator=g)
    mat = torch.randn(23, 16, generator=g)
    order = torch.sort(q @ mat.T, dim=1, descending=True, stable=True)
    s, i, _ = _topk_in_chunks(q, mat, 10, chunk=4)
    assert torch.equal(i, order.indices[:, :10])


@cases
def test_error_bound_covers_the_preselection():
    """The pre-selection's segment maxima are within score_error_bound of the exact fp32 maxima."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(20, 64, generator=g) * 3
    for rows in (torch.randn(640, 64, generator=g).half(), torch.randn(640, 64, generator=g)):
        rows = rows.to(DEVICE)
        approx = flash.segment_maxima(q.to(DEVICE), rows).cpu()
        exact = (q.double() @ rows.cpu().double().T).reshape(20, -1, flash.SEG).amax(2)
        bound = flash.score_error_bound(q.to(DEVICE), rows).cpu().double()
        assert ((approx.double() - exact).abs() <= bound[:, None]).all()


@cases
def test_trimodal_loss_through_the_flash_path(monkeypatch):
    """The whole loss (three pairs, class ids, the scale's gradient) with its pair statistics on the flash
    kernels, against the float64 reference. On a GPU through GALAXALIGN_CUDA_LOSS=flash; in the interpreter
    the CPU dispatch is pointed at the flash kernels (bf16 kept as bf16)."""
    from galaxalign_batch.ops import backends, fused, trimodal_contrastive_loss

    if ON_GPU:
        monkeypatch.setenv("GALAXALIGN_CUDA_LOSS", "flash")
    else:
        pytest.importorskip("galaxalign_batch._core")
        used = []
        monkeypatch.setattr(fused, "use_flash_loss", lambda x: used.append(x.dtype) or x.dtype in flash.HALF)
        monkeypatch.setattr(backends, "cpu_bf16_kernels", lambda: "bf16 (test: flash kernels in the interpreter)")
    g = torch.Generator().manual_seed(10)
    feats = [F.normalize(torch.randn(150, 40, generator=g, dtype=torch.float64), dim=1).to(torch.bfloat16).double()
             for _ in range(3)]
    ids = torch.randint(0, 6, (150,), generator=g)
    out = []
    for device, dtype, impl in (("cpu", torch.float64, "reference"), (DEVICE, torch.bfloat16, "fused")):
        leaves = [x.to(device, dtype).detach().requires_grad_() for x in feats]
        scale = torch.tensor(20.0, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                             requires_grad=True)
        loss = trimodal_contrastive_loss(*leaves, scale, class_ids=ids.to(device), weights=(1.0, 0.5, 2.0), impl=impl)
        loss.backward()
        out.append((loss.detach().double().cpu(), [x.grad.double().cpu() for x in leaves], scale.grad.double().cpu()))
    if not ON_GPU:
        assert used and all(dt == torch.bfloat16 for dt in used)
    (ref_loss, ref_grads, ref_s), (loss, grads, s) = out
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=4e-3 * float(want.abs().max()))
    torch.testing.assert_close(s, ref_s, rtol=1e-3, atol=1e-4)


@cases
def test_topk_refuses_queries_beyond_fp16_range():
    q = torch.full((2, 16), 4e4)
    rows = torch.randn(40, 16).half().to(DEVICE)
    best_s, best_i = torch.full((2, 3), -float("inf"), device=DEVICE), torch.full((2, 3), -1, device=DEVICE)
    with pytest.raises(ValueError, match="fp16's range"):
        flash.topk_update(q.to(DEVICE), rows, 0, 3, best_s, best_i)


@cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_logsumexp_rectangular(dtype, monkeypatch):
    """ops.row_logsumexp (the global-negatives building block) on the flash kernels: n != m, a signed upstream
    gradient, several backward row chunks; against float64 autograd."""
    from galaxalign_batch.ops import fused, row_logsumexp

    monkeypatch.setenv("GALAXALIGN_TILE_MB", "1")
    if ON_GPU:
        monkeypatch.setenv("GALAXALIGN_CUDA_LOSS", "flash")
    else:
        monkeypatch.setattr(fused, "use_flash_loss", lambda x: x.dtype in flash.HALF)
    a, b = _pair(300, 1900, 40, dtype, seed=4)
    w = torch.randn(300, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = []
    for device, dt, impl in (("cpu", torch.float64, "reference"), (DEVICE, dtype, "fused")):
        x = a.to(device, dt).detach().requires_grad_()
        y = b.to(device, dt).detach().requires_grad_()
        s = torch.tensor(17.0, device=device, dtype=torch.float64 if dt == torch.float64 else torch.float32,
                         requires_grad=True)
        lse = row_logsumexp(x, y, s, impl=impl)
        (lse * w.to(device, lse.dtype)).sum().backward()
        out.append([t.double().cpu() for t in (lse.detach(), x.grad, y.grad, s.grad)])
    (lse, ga, gb, gs), (lse_ref, ga_ref, gb_ref, gs_ref) = out[1], out[0]
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=2e-5)
    tol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    for got, want in ((ga, ga_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=tol * float(want.abs().max()))
    torch.testing.assert_close(gs, gs_ref, rtol=1e-4, atol=1e-5)


@cases
def test_row_logsumexp_zero_upstream_gradient():
    a, b = _pair(20, 30, 16, torch.bfloat16, seed=2)
    x = a.to(DEVICE).requires_grad_()
    y = b.to(DEVICE).requires_grad_()
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    (flash.row_logsumexp(x, y, s) * 0).sum().backward()
    assert not x.grad.any() and not y.grad.any() and float(s.grad) == 0.0


@cases
@pytest.mark.parametrize("kind", ["numpy-fp16", "tensor-fp32"])
def test_similarity_topk_through_the_flash_path(kind, monkeypatch):
    """ops.similarity_topk with its top-k on the flash kernels: a host numpy matrix streamed in chunks, and a
    resident tensor scored in one chunk; integer data, so the answer is exact, ties by lower row index."""
    from galaxalign_batch.ops import fused, similarity_topk

    if ON_GPU:
        monkeypatch.setenv("GALAXALIGN_CUDA_TOPK", "flash")
    else:
        pytest.importorskip("galaxalign_batch._core")
        monkeypatch.setattr(fused, "use_flash_topk", lambda q, matrix: True)
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-2, 3, (30, 24), generator=g).float()
    mat = torch.randint(-2, 3, (2600, 24), generator=g).float()
    order = torch.sort(q @ mat.T, dim=1, descending=True, stable=True)
    matrix = mat.half().numpy() if kind == "numpy-fp16" else mat.to(DEVICE)
    scores, index = similarity_topk(q.to(DEVICE), matrix, 12, chunk_rows=700, impl="fused")
    assert torch.equal(index.cpu(), order.indices[:, :12])
    assert torch.equal(scores.cpu(), order.values[:, :12])


@cases
@pytest.mark.skipif(ON_GPU, reason="the GPU check runs the benchmark itself")
def test_flash_kernel_benchmark_runs(tmp_path):
    """bench/flash_kernels.py (what a GPU lease runs) at toy sizes in the interpreter, so it cannot rot unseen."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "flash_kernels.py")
    proc = subprocess.run([sys.executable, "-W", "ignore", script, "--smoke", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["rows"]
    assert report["complete"]  # written after every row too (a run stopped by its time limit keeps them)
    assert {r["kernel"] for r in rows} >= {"pair_lse_forward", "pair_weights", "segment_maxima", "topk_update"}
    assert all(r["time_s"] > 0 for r in rows)
