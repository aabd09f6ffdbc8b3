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
def test_loss_float32_matches_reference(n, d, classes):
    feats = _features(n, d, seed=n)
    ids = torch.randint(0, 7, (n,)) if classes else None
    ref = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "reference", "cpu", torch.float64)
    got = _run(feats, 20.0, ids, (1.0, 0.5, 2.0), "fused", "cuda", torch.float32)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-3, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_half_inputs(dtype):
    feats = [x.to(dtype).double() for x in _features(257, 96, seed=3)]  # the values the kernel sees
    ref = _run(feats, 14.0, None, (1.0, 1.0, 1.0), "reference", "cpu", torch.float64)
    got = _run(feats, 14.0, None, (1.0, 1.0, 1.0), "fused", "cuda", dtype)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-4)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-4)


@gpu
def test_loss_extreme_scale():
    g = torch.Generator().manual_seed(9)
    base = F.normalize(torch.randn(1, 16, generator=g, dtype=torch.float64), dim=1)
    feats = [F.normalize(base + 1e-3 * torch.randn(70, 16, generator=g, dtype=torch.float64), dim=1) for _ in range(3)]
    got = _run(feats, 1e4, None, (1, 1, 1), "fused", "cuda", torch.float32)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(x).all() for x in got[1])


@gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_topk_exact_on_integer_data(fp16):
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
