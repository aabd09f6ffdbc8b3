"""The CUDA kernels (galaxalign_batch._cuda) against the PyTorch reference.

Needs a CUDA device: skipped otherwise (CI builds the module with GALAXALIGN_CUDA=ON so that a
kernel that does not compile fails there; only the import test below runs without a GPU).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from galaxalign_batch.ops import prototype_probs, similarity_topk, trimodal_contrastive_loss

try:
    _cuda = importlib.import_module("galaxalign_batch._cuda")
except ImportError:
    _cuda = None

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _cuda is not None), reason="needs a CUDA device and galaxalign_batch._cuda")


@pytest.mark.skipif(_cuda is None, reason="galaxalign_batch._cuda not built")
def test_module_exposes_the_kernels():
    for name in ("trimodal_loss_forward", "trimodal_loss_backward", "topk_update", "prototype_probs"):
        assert callable(getattr(_cuda, name))
    assert _cuda.runtime_version() >= 12000
    assert _cuda.device_count() >= 0


@pytest.fixture(params=["tc", "tc-torch-epilogue", "simt", "flash"])
def cuda_path(request, monkeypatch):
    """Every CUDA path: ``tc`` (cuBLAS tile products, tensor cores for half inputs, the ``_cuda`` tile
    epilogues), the same with torch ops as epilogue, ``simt`` (the hand-written CUDA-core kernels) and
    ``flash`` (Triton kernels, ``ops/flash.py``; fp32 loss inputs take ``tc`` there)."""
    if request.param == "flash":
        pytest.importorskip("triton")
    path = request.param.split("-")[0]
    monkeypatch.setenv("GALAXALIGN_CUDA_LOSS", path)
    monkeypatch.setenv("GALAXALIGN_CUDA_TOPK", path)
    monkeypatch.setenv("GALAXALIGN_CUDA_EPILOGUE", "torch" if "torch" in request.param else "cuda")
    return request.param


def _features(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for _ in range(3)]


def _run(feats, scale, class_ids, weights, impl, device, dtype):
    leaves = [x.to(device=device, dtype=dtype).detach().requires_grad_() for x in feats]
    s = torch.tensor(scale, device=device, dtype=torch.float32 if dtype != torch.float64 else torch.float64, requires_grad=True)
    loss = trimodal_contrastive_loss(*leaves, s, class_ids=None if class_ids is None else class_ids.to(device), weights=weights, impl=impl)
    loss.backward()
    return loss.detach().double().cpu(), [x.grad.double().cpu() for x in leaves], s.grad.double().cpu()


@gpu
@pytest.mark.parametrize("n,d,classes", [(1, 5, False), (97, 33, True), (300, 512, False), (1000, 129, True)])
def test_loss_float32_matches_reference(n, d, classes, cuda_path):
    feats = _features(n, d, seed=n)
    ids = torch.randint(0, 7, (n,)) if classes else None
    ref = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "reference", "cpu", torch.float64)
    got = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "fused", "cuda", torch.float32)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-5, abs=1e-5)  # n = 1: the loss is 0 up to rounding
    for a, b in zip(got[1], ref[1]):
        # n = 1: every gradient is a cancellation to 0 of fp32 terms of size ~scale (seen: 1.1e-5 on an H200)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 if n > 1 else 5e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-3, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_half_inputs(dtype, cuda_path):
    feats = [x.to(dtype).double() for x in _features(257, 96, seed=3)]  # the values the kernel sees
    ref = _run(feats, 14.0, None, (1.0, 1.0, 1.0), "reference", "cpu", torch.float64)
    got = _run(feats, 14.0, None, (1.0, 1.0, 1.0), "fused", "cuda", dtype)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-4)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-4)


@gpu
def test_loss_extreme_scale(cuda_path):
    g = torch.Generator().manual_seed(9)
    base = F.normalize(torch.randn(1, 16, generator=g, dtype=torch.float64), dim=1)
    feats = [F.normalize(base + 1e-3 * torch.randn(70, 16, generator=g, dtype=torch.float64), dim=1) for _ in range(3)]
    got = _run(feats, 1e4, None, (1, 1, 1), "fused", "cuda", torch.float32)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(x).all() for x in got[1])


@gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_topk_exact_on_integer_data(fp16, cuda_path):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-3, 4, (150, 20), generator=g).float()
    mat = torch.randint(-3, 4, (5000, 20), generator=g).float()
    full = q @ mat.T
    order = torch.sort(full, dim=1, descending=True, stable=True)
    matrix = mat.half() if fp16 else mat
    scores, index = similarity_topk(q.cuda(), matrix, 25, chunk_rows=1700, impl="fused")
    assert torch.equal(scores.cpu(), order.values[:, :25])
    assert torch.equal(index.cpu(), order.indices[:, :25])


@gpu
def test_prototype_probs():
    g = torch.Generator().manual_seed(2)
    f, p = torch.randn(300, 64, generator=g), torch.randn(130, 64, generator=g)
    got = prototype_probs(f.cuda(), p.cuda(), 3.0, impl="fused").cpu()
    torch.testing.assert_close(got, torch.softmax(3.0 * f @ p.T, dim=1), rtol=1e-4, atol=1e-6)


@gpu
@pytest.mark.parametrize("epilogue", ["cuda", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_logsumexp_rectangular(dtype, epilogue, monkeypatch):
    monkeypatch.setenv("GALAXALIGN_TILE_MB", "1")  # several tiles
    monkeypatch.setenv("GALAXALIGN_CUDA_EPILOGUE", epilogue)
    from galaxalign_batch.ops import row_logsumexp

    g = torch.Generator().manual_seed(4)
    a = F.normalize(torch.randn(700, 96, generator=g, dtype=torch.float64), dim=1).to(dtype).double()
    b = F.normalize(torch.randn(1900, 96, generator=g, dtype=torch.float64), dim=1).to(dtype).double()
    w = torch.randn(700, generator=g, dtype=torch.float64)
    out = []
    for device, dt in (("cpu", torch.float64), ("cuda", dtype)):
        x = a.to(device, dt).detach().clone().requires_grad_()
        y = b.to(device, dt).detach().clone().requires_grad_()
        s = torch.tensor(17.0, device=device, dtype=torch.float32 if dt != torch.float64 else dt, requires_grad=True)
        lse = row_logsumexp(x, y, s, impl="reference" if device == "cpu" else "fused")
        (lse * w.to(device, lse.dtype)).sum().backward()
        out.append([t.double().cpu() for t in (lse.detach(), x.grad, y.grad, s.grad)])
    for got, ref in zip(out[1], out[0]):
        # bf16: the softmax weights enter the gradient GEMMs as bf16 (2^-9 relative), so elements that cancel
        # to near 0 carry an absolute error of a few 1e-3 of the gradient's scale (seen: 1.4e-3 of ~1 on an H200)
        scale = float(ref.abs().max())
        tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=3e-2, atol=4e-3 * scale)
        torch.testing.assert_close(got, ref, **tol)


@gpu
def test_topk_device_matrix_random(cuda_path):
    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(333, 64, generator=g), dim=1)
    mat = F.normalize(torch.randn(20000, 64, generator=g), dim=1)
    ref_s, ref_i = (q @ mat.T).topk(7, dim=1)
    scores, index = similarity_topk(q.cuda(), mat.cuda(), 7, chunk_rows=6000, impl="fused")
    torch.testing.assert_close(scores.cpu(), ref_s, rtol=1e-5, atol=1e-5)
    assert (index.cpu() == ref_i).float().mean() > 0.999


@gpu
def test_loss_large_batch_blocked(monkeypatch):
    """B = 6000 over several tiles (a 4 MiB tile budget) on the tensor-core path, bf16 inputs, class ids."""
    monkeypatch.setenv("GALAXALIGN_CUDA_LOSS", "tc")
    monkeypatch.setenv("GALAXALIGN_TILE_MB", "4")
    feats = [x.to(torch.bfloat16).double() for x in _features(6000, 64, seed=11)]
    ids = torch.randint(0, 10, (6000,))
    ref = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "reference", "cpu", torch.float64)
    got = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "fused", "cuda", torch.bfloat16)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-4)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-2, atol=1e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_flash_full_tiles(dtype, monkeypatch):
    """The flash path at D = 512 (no K mask) over many 128 x 128 tiles and five backward row chunks (640 rows each in 4 MiB), class ids."""
    pytest.importorskip("triton")
    monkeypatch.setenv("GALAXALIGN_CUDA_LOSS", "flash")
    monkeypatch.setenv("GALAXALIGN_TILE_MB", "4")
    feats = [x.to(dtype).double() for x in _features(3000, 512, seed=12)]
    ids = torch.randint(0, 10, (3000,))
    ref = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "reference", "cpu", torch.float64)
    got = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "fused", "cuda", dtype)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-4)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-2, atol=1e-3)


@pytest.fixture
def without_cuda_module(monkeypatch):
    """A GPU machine where ``galaxalign_batch._cuda`` was not built (no nvcc at install, GALAXALIGN_CUDA=OFF)."""
    from galaxalign_batch.ops import backends

    real = backends.module_for
    monkeypatch.setattr(backends, "module_for", lambda device: None if device.type == "cuda" else real(device))
    monkeypatch.setattr(backends, "_warned", set())


@pytest.mark.parametrize("kernel,env,path,want", [
    ("trimodal_loss", "GALAXALIGN_CUDA_LOSS", "tc", "fused"),     # cuBLAS tiles, torch epilogue
    ("trimodal_loss", "GALAXALIGN_CUDA_LOSS", "flash", "fused"),  # Triton (half), tc (fp32)
    ("trimodal_loss", "GALAXALIGN_CUDA_LOSS", "simt", "reference"),
    ("topk", "GALAXALIGN_CUDA_TOPK", "flash", "fused"),
    ("topk", "GALAXALIGN_CUDA_TOPK", "tc", "reference"),          # its selection kernel is _cuda's
    ("prototype_probs", "GALAXALIGN_CUDA_TOPK", "flash", "reference"),
])
def test_cuda_paths_that_need_no_cuda_module_are_not_given_up(kernel, env, path, want, monkeypatch, without_cuda_module):
    """Without ``_cuda``, ``impl="auto"`` keeps the CUDA paths that run on cuBLAS/Triton alone (it fell back to
    the reference for all of them); only what needs ``_cuda`` falls back, with a warning. CPU-only: a decision."""
    from galaxalign_batch.errors import ConfigError
    from galaxalign_batch.ops.backends import resolve_impl

    monkeypatch.setenv(env, path)
    cuda = torch.device("cuda")
    if want == "fused":
        assert resolve_impl("auto", cuda, kernel, torch.bfloat16) == "fused"
        assert resolve_impl("fused", cuda, kernel, torch.float32) == "fused"
        return
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        assert resolve_impl("auto", cuda, kernel, torch.float32) == "reference"
    with pytest.raises(ConfigError, match="no compiled kernel"):
        resolve_impl("fused", cuda, kernel, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["tc", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_topk_without_cuda_module(path, dtype, monkeypatch, without_cuda_module):
    """What the decision above promises runs: the loss on tc/flash and the flash top-k (including queries it
    cannot pre-select against fp16 rows, served by the reference) without ``_cuda``."""
    if path == "flash":
        pytest.importorskip("triton")
    monkeypatch.setenv("GALAXALIGN_CUDA_LOSS", path)
    monkeypatch.setenv("GALAXALIGN_CUDA_TOPK", path)
    feats = [x.to(dtype).double() for x in _features(300, 64, seed=21)]
    ref = _run(feats, 20.0, None, (1.0, 0.5, 2.0), "reference", "cpu", torch.float64)
    got = _run(feats, 20.0, None, (1.0, 0.5, 2.0), "fused", "cuda", dtype)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-4)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-5)
    if path != "flash":
        return
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-3, 4, (50, 20), generator=g).float()
    mat = torch.randint(-3, 4, (3000, 20), generator=g).float()
    order = torch.sort(q @ mat.T, dim=1, descending=True, stable=True)
    for queries in (q, q * 1e4):  # 1e4: beyond half of fp16's range, the reference serves them
        scores, index = similarity_topk(queries.cuda(), mat.half(), 10, chunk_rows=1000, impl="fused")
        assert torch.equal(index.cpu(), order.indices[:, :10])
