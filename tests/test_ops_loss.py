"""Tri-modal contrastive loss: the PyTorch reference (hand-computed cases, class-aware masking)
and the fused CPU kernels against it (values and every gradient)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.ops import reference, trimodal_contrastive_loss
from galaxalign_batch.ops.backends import kernel_module

HAVE_CORE = kernel_module(torch.device("cpu"), "trimodal_loss") is not None
needs_core = pytest.mark.skipif(not HAVE_CORE, reason="galaxalign_batch._core not built")


def _features(n: int, d: int, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype) for _ in range(3)]


def _loss_and_grads(feats, scale, class_ids=None, weights=(1.0, 1.0, 1.0), impl="reference"):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in feats]
    s = torch.tensor(float(scale), dtype=torch.float64 if feats[0].dtype == torch.float64 else torch.float32, requires_grad=True)
    loss = trimodal_contrastive_loss(*leaves, s, class_ids=class_ids, weights=weights, impl=impl)
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves], s.grad


def _explicit_pair_loss(a, b, s, class_ids=None) -> float:
    """The loss written out element by element, for the masking checks."""
    n = a.shape[0]
    L = [[s * float(a[i] @ b[j]) for j in range(n)] for i in range(n)]
    same = (lambda i, j: class_ids[i] == class_ids[j]) if class_ids is not None else (lambda i, j: i == j)
    rows = []
    for i in range(n):
        pos = [L[i][j] for j in range(n) if same(i, j)]
        rows.append(math.log(sum(math.exp(v) for v in L[i])) - sum(pos) / len(pos))
    cols = []
    for j in range(n):
        pos = [L[i][j] for i in range(n) if same(i, j)]
        cols.append(math.log(sum(math.exp(L[i][j]) for i in range(n))) - sum(pos) / len(pos))
    return 0.5 * (sum(rows) / n + sum(cols) / n)


# ------------------------------------------------------------------------------------------------
# Reference: hand-computed small case


IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
# With s = 1, L = IMAGE @ TEXT.T = [[1.0, 0.6], [0.0, 0.8]]:
#   row_0 = log(e^1 + e^0.6) - 1     = log(2.718282 + 1.822119) - 1 = 0.513015
#   row_1 = log(e^0 + e^0.8) - 0.8   = log(1 + 2.225541) - 0.8      = 0.371101
#   col_0 = log(e^1 + e^0) - 1       = log(3.718282) - 1            = 0.313262
#   col_1 = log(e^0.6 + e^0.8) - 0.8 = log(4.047660) - 0.8          = 0.598139
#   pair  = 0.5 * ((0.513015 + 0.371101) / 2 + (0.313262 + 0.598139) / 2) = 0.448879
IT_PAIR = 0.448879
# symbol = IMAGE: (image, symbol) has L = identity, every row/column term is log(e + 1) - 1 = 0.313262,
# and (symbol, text) equals (image, text). Weights (1, 0.5, 2): 0.448879 + 0.5 * 0.313262 + 2 * 0.448879.
TOTAL = 0.448879 + 0.5 * 0.313262 + 2 * 0.448879  # = 1.503268
# Both items in one class (class_ids = [0, 0]): every entry is a positive, the positive means are the
# row/column means of L: rows 0.8, 0.4, columns 0.5, 0.7:
#   row_0 = 1.513015 - 0.8 = 0.713015   row_1 = 1.171101 - 0.4 = 0.771101
#   col_0 = 1.313262 - 0.5 = 0.813262   col_1 = 1.398139 - 0.7 = 0.698139
#   pair  = 0.5 * ((0.713015 + 0.771101) / 2 + (0.813262 + 0.698139) / 2) = 0.748879
ONE_CLASS_PAIR = 0.748879


@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=needs_core)])
def test_hand_computed_pair(impl):
    one = torch.tensor(1.0, dtype=torch.float64)
    loss = trimodal_contrastive_loss(IMAGE, TEXT, None, one, weights=(1, 0, 0), impl=impl)
    assert loss.item() == pytest.approx(IT_PAIR, abs=1e-6)


@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=needs_core)])
def test_hand_computed_trimodal_weights(impl):
    one = torch.tensor(1.0, dtype=torch.float64)
    loss = trimodal_contrastive_loss(IMAGE, TEXT, IMAGE.clone(), one, weights=(1.0, 0.5, 2.0), impl=impl)
    assert loss.item() == pytest.approx(TOTAL, abs=1e-6)


@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=needs_core)])
def test_hand_computed_one_class(impl):
    one = torch.tensor(1.0, dtype=torch.float64)
    loss = trimodal_contrastive_loss(IMAGE, TEXT, None, one, class_ids=torch.tensor([3, 3]), weights=(1, 0, 0), impl=impl)
    assert loss.item() == pytest.approx(ONE_CLASS_PAIR, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Reference: class-aware masking


def test_positive_mask():
    ids = torch.tensor([2, 0, 2, 1])
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(reference.positive_mask(ids, 4, ids.device), expected)
    assert torch.equal(reference.positive_mask(None, 3, ids.device), torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("ids", [[0, 1, 0, 2, 1, 0], [5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 0]])
def test_reference_matches_explicit_masked_loss(ids):
    image, text, _ = _features(6, 4, seed=1)
    class_ids = torch.tensor(ids)
    got = reference.pair_loss(image, text, torch.tensor(3.0, dtype=torch.float64), class_ids).item()
    assert got == pytest.approx(_explicit_pair_loss(image, text, 3.0, ids), rel=1e-12)


def test_every_item_its_own_class_equals_no_class_ids():
    feats = _features(9, 5, seed=2)
    s = torch.tensor(4.0, dtype=torch.float64)
    own = trimodal_contrastive_loss(*feats, s, class_ids=torch.arange(9) * 7, impl="reference")
    plain = trimodal_contrastive_loss(*feats, s, impl="reference")
    assert own.item() == pytest.approx(plain.item(), rel=1e-14)


def test_class_relabelling_does_not_change_the_loss():
    feats = _features(8, 3, seed=3)
    s = torch.tensor(2.5, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1])
    relabelled = torch.tensor([9, -4, -4, 100, 9, 100, 100, -4])
    a = trimodal_contrastive_loss(*feats, s, class_ids=ids, impl="reference")
    b = trimodal_contrastive_loss(*feats, s, class_ids=relabelled, impl="reference")
    assert a.item() == pytest.approx(b.item(), rel=1e-14)


def test_identical_classmates_count_like_the_diagonal():
    # Each class holds two copies of one embedding: the positive mean equals the diagonal entry, so
    # the class-aware loss equals the plain one, and each row keeps its twin in the partition
    # function, so every term is at least log 2.
    base = F.normalize(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), dim=1)
    x = base.repeat_interleave(2, dim=0)
    s = torch.tensor(10.0, dtype=torch.float64)
    ids = torch.arange(3).repeat_interleave(2)
    aware = trimodal_contrastive_loss(x, x, None, s, class_ids=ids, weights=(1, 0, 0), impl="reference")
    plain = trimodal_contrastive_loss(x, x, None, s, weights=(1, 0, 0), impl="reference")
    assert aware.item() == pytest.approx(plain.item(), rel=1e-14)
    assert aware.item() > math.log(2)


# ------------------------------------------------------------------------------------------------
# API checks


def test_none_feature_with_zero_weight_and_errors():
    image, text, symbol = _features(4, 3)
    s = torch.tensor(2.0, dtype=torch.float64)
    clip = trimodal_contrastive_loss(image, text, None, s, weights=(1, 0, 0), impl="reference")
    assert clip.item() == pytest.approx(reference.pair_loss(image, text, s).item())
    with pytest.raises(ConfigError, match="symbol is None"):
        trimodal_contrastive_loss(image, text, None, s)
    with pytest.raises(ConfigError, match="shape"):
        trimodal_contrastive_loss(image, text[:3], symbol, s)
    with pytest.raises(ConfigError, match="all three pair weights"):
        trimodal_contrastive_loss(image, text, symbol, s, weights=(0, 0, 0))
    with pytest.raises(ConfigError, match="impl"):
        trimodal_contrastive_loss(image, text, symbol, s, impl="magic")
    with pytest.raises(ConfigError, match="class_ids"):
        trimodal_contrastive_loss(image, text, symbol, s, class_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="logit_scale"):
        trimodal_contrastive_loss(image, text, symbol, torch.ones(2))


# ------------------------------------------------------------------------------------------------
# Fused (CPU) against the reference


CASES = [
    # n, d, class ids, scale, weights
    (1, 5, None, 10.0, (1.0, 1.0, 1.0)),
    (2, 2, "one", 3.0, (1.0, 0.5, 2.0)),
    (97, 33, "few", 14.0, (1.0, 1.0, 1.0)),
    (193, 7, "own", 20.0, (0.3, 0.0, 1.7)),
    (250, 64, "one", 50.0, (1.0, 1.0, 0.0)),
    (130, 129, None, 1.0, (0.0, 1.0, 0.0)),
]


def _class_ids(kind, n):
    if kind is None:
        return None
    if kind == "one":
        return torch.full((n,), 4)
    if kind == "own":
        return torch.arange(n)
    return torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))


@needs_core
@pytest.mark.parametrize("n,d,kind,scale,weights", CASES)
def test_fused_float64_matches_reference(n, d, kind, scale, weights):
    feats = _features(n, d, seed=n + d)
    feats = [x if w_used else None for x, w_used in zip(feats, _used(weights))]
    class_ids = _class_ids(kind, n)
    ref = _loss_and_grads(feats, scale, class_ids, weights, "reference")
    got = _loss_and_grads(feats, scale, class_ids, weights, "fused")
    assert got[0].dtype == torch.float64
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-12, abs=1e-12)
    for g_ref, g_got in zip(ref[1], got[1]):
        if g_ref is None:
            assert g_got is None
        else:
            torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-13)


def _used(weights):
    w_it, w_is, w_st = weights
    return (w_it != 0 or w_is != 0, w_it != 0 or w_st != 0, w_is != 0 or w_st != 0)


@needs_core
@pytest.mark.parametrize("n,d", [(300, 512), (161, 50)])
def test_fused_float32_matches_reference(n, d):
    feats64 = _features(n, d, seed=7)
    class_ids = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    ref = _loss_and_grads(feats64, 30.0, class_ids, (1.0, 0.5, 0.25), "reference")  # float64 ground truth
    got = _loss_and_grads([x.float() for x in feats64], 30.0, class_ids, (1.0, 0.5, 0.25), "fused")
    assert got[0].dtype == torch.float32
    # float32 tolerance: about 1e-6 relative on the loss, 1e-5 on gradients (scale * |x| ~ 30).
    assert got[0].item() == pytest.approx(ref[0].item(), rel=2e-6)
    for g_ref, g_got in zip(ref[1], got[1]):
        torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=1e-4, atol=1e-6)


@needs_core
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_inputs_upcast_on_cpu(dtype):
    feats = [x.to(dtype) for x in _features(120, 40, seed=8)]
    got = _loss_and_grads(feats, 12.0, None, (1.0, 1.0, 1.0), "fused")
    ref = _loss_and_grads([x.double() for x in feats], 12.0, None, (1.0, 1.0, 1.0), "reference")
    # Computed in float32 from the half-precision inputs (bf16 on a CPU with AVX512-BF16: the bf16 kernels,
    # fp32 accumulation, tested on their own in test_bf16_inputs_match_reference); gradients are returned in
    # the input dtype.
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    for g_ref, g_got in zip(ref[1], got[1]):
        assert g_got.dtype == dtype
        torch.testing.assert_close(g_got.double(), g_ref, rtol=2e-2, atol=2e-4)


@needs_core
def test_extreme_scale_near_identical_vectors_does_not_overflow():
    g = torch.Generator().manual_seed(9)
    base = F.normalize(torch.randn(1, 16, generator=g, dtype=torch.float64), dim=1)
    feats = [F.normalize(base + 1e-3 * torch.randn(40, 16, generator=g, dtype=torch.float64), dim=1) for _ in range(3)]
    for scale in (1e3, 1e5):
        ref = _loss_and_grads(feats, scale, None, (1, 1, 1), "reference")
        got = _loss_and_grads(feats, scale, None, (1, 1, 1), "fused")
        assert math.isfinite(got[0].item())
        assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-9)
        for g_ref, g_got in zip(ref[1], got[1]):
            assert torch.isfinite(g_got).all()
            torch.testing.assert_close(g_got, g_ref, rtol=1e-7, atol=1e-9 * scale)
    got32 = _loss_and_grads([x.float() for x in feats], 1e5, None, (1, 1, 1), "fused")
    assert math.isfinite(got32[0].item()) and all(torch.isfinite(x).all() for x in got32[1])


@needs_core
def test_fused_gradcheck():
    feats = [x.requires_grad_() for x in _features(11, 6, seed=10)]
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 2, 1, 0, 3, 3, 1, 0])
    fn = lambda i, t, y, sc: trimodal_contrastive_loss(i, t, y, sc, class_ids=ids, weights=(1.0, 0.7, 0.2), impl="fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*feats, s))


@needs_core
def test_fused_is_independent_of_thread_count():
    feats = _features(300, 48, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_and_grads(feats, 20.0, None, (1, 1, 1), "fused")
        torch.set_num_threads(2)
        two = _loss_and_grads(feats, 20.0, None, (1, 1, 1), "fused")
    finally:
        torch.set_num_threads(before)
    assert one[0].item() == pytest.approx(two[0].item(), rel=1e-13)
    for a, b in zip(one[1], two[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@needs_core
def test_auto_uses_fused_on_cpu(monkeypatch):
    from galaxalign_batch.ops import fused

    calls = []
    original = fused.TrimodalLoss.apply
    monkeypatch.setattr(fused.TrimodalLoss, "apply", lambda *a: calls.append(1) or original(*a))
    feats = _features(5, 3)
    trimodal_contrastive_loss(*feats, torch.tensor(2.0, dtype=torch.float64), impl="auto")
    assert len(calls) == 1


def _cpu_supports(level: str) -> bool:
    from galaxalign_batch import _core

    return level == "v2" or bool(getattr(_core, f"cpu_supports_{level}")())


@needs_core
@pytest.mark.parametrize("level", ["v2", "v3", "v4"])
def test_every_isa_level_matches_reference(level):
    """Each instruction-set level this CPU runs (x86-64-v2 SSE4.2, v3 AVX2, v4 AVX-512), forced with
    GALAXALIGN_CPU_ISA in a fresh process: loss and gradients (float64 and float32), top-k (fp32 and
    fp16 rows, exact on integer data) and prototype probabilities against the PyTorch reference."""
    if not _cpu_supports(level):
        pytest.skip(f"this CPU does not run the x86-64-{level} kernels")
    code = (
        "import numpy as np, torch, torch.nn.functional as F\n"
        "from galaxalign_batch import _core\n"
        "from galaxalign_batch.ops import trimodal_contrastive_loss as L, similarity_topk, prototype_probs\n"
        f"assert _core.similarity_isa().startswith('x86-64-{level}'), _core.similarity_isa()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    f = [F.normalize(torch.randn(101, 37, generator=g, dtype=dt), dim=1).requires_grad_() for _ in range(3)]\n"
        "    ids = torch.randint(0, 4, (101,), generator=g)\n"
        "    out = []\n"
        "    for impl in ('reference', 'fused'):\n"
        "        for x in f: x.grad = None\n"
        "        l = L(*f, torch.tensor(9.0, dtype=dt), class_ids=ids, impl=impl); l.backward()\n"
        "        out.append([l.detach()] + [x.grad.clone() for x in f])\n"
        "    tol = 1e-10 if dt == torch.float64 else 1e-4\n"
        "    for a, b in zip(*out): torch.testing.assert_close(a, b, rtol=tol, atol=tol)\n"
        "q = torch.randint(-3, 4, (70, 19), generator=g).float()\n"
        "m = torch.randint(-3, 4, (3000, 19), generator=g).float()\n"
        "ref = torch.sort(q @ m.T, dim=1, descending=True, stable=True)\n"
        "for rows in (m, m.half().numpy()):\n"
        "    s, i = similarity_topk(q, rows, 12, chunk_rows=700, impl='fused')\n"
        "    assert torch.equal(s, ref.values[:, :12]) and torch.equal(i, ref.indices[:, :12])\n"
        "p = torch.randn(13, 19, generator=g)\n"
        "torch.testing.assert_close(prototype_probs(q, p, 0.3, impl='fused'), torch.softmax(0.3 * q @ p.T, 1), rtol=1e-4, atol=1e-6)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, GALAXALIGN_CPU_ISA=level)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@needs_core
def test_isa_level_the_cpu_lacks_is_an_error():
    env = dict(os.environ, GALAXALIGN_CPU_ISA="v9")
    code = "from galaxalign_batch import _core; _core.similarity_isa()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "GALAXALIGN_CPU_ISA must be v2, v3, v4 or auto" in result.stderr


# bf16 features on the CPU: with GALAXALIGN_CPU_BF16=1 the AVX512-BF16 kernels (vdpbf16ps, fp32
# accumulation), with 0 the upcast to float32. Run in a fresh process per mode (the choice is made once per
# process), on the float64 cases above plus the float32 ones, against the float64 reference on the same
# (bf16-representable) values. Tolerances, bf16 kernels: the products of two bf16 are exact in fp32, so the
# loss carries only fp32 accumulation error (rel 1e-5); the softmax weights enter the gradient products
# rounded to bf16 (2^-9 relative) and the gradients are returned in bf16 (another 2^-9), so each feature
# gradient is held to 8e-3 of its largest element (measured: up to 4e-3); the scale's gradient comes from
# the fp32 tiles (rel 1e-4, abs 1e-5).
BF16_CASES = CASES + [(300, 512, "few", 30.0, (1.0, 0.5, 0.25)), (1000, 40, None, 25.0, (1.0, 1.0, 1.0))]
_BF16_CHECK = """
import json, sys, torch, torch.nn.functional as F
from galaxalign_batch import _core
from galaxalign_batch.ops import trimodal_contrastive_loss as L
calls = []
for name in ("trimodal_loss_forward_bf16", "trimodal_loss_backward_bf16"):
    setattr(_core, name, (lambda fn, name: lambda *a: calls.append(name) or fn(*a))(getattr(_core, name), name))
torch.set_num_threads(2)
worst = {"loss_rel": 0.0, "grad_of_max": 0.0, "scale_rel": 0.0}
for n, d, kind, scale, weights in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(n + d)
    feats = [F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).bfloat16() for _ in range(3)]
    ids = None if kind is None else torch.full((n,), 4) if kind == "one" else torch.arange(n) if kind == "own" \
        else torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))
    w_it, w_is, w_st = weights
    used = (w_it != 0 or w_is != 0, w_it != 0 or w_st != 0, w_is != 0 or w_st != 0)
    def run(dt, impl):
        leaves = [x.to(dt).clone().requires_grad_() if u else None for x, u in zip(feats, used)]
        s = torch.tensor(scale, dtype=torch.float64 if dt == torch.float64 else torch.float32, requires_grad=True)
        loss = L(*leaves, s, class_ids=ids, weights=weights, impl=impl)
        loss.backward()
        return loss.detach().double(), [None if x is None else x.grad for x in leaves], s.grad.double()
    ref, got = run(torch.float64, "reference"), run(torch.bfloat16, "fused")
    again = run(torch.bfloat16, "fused")
    assert torch.equal(got[0], again[0]) and all(a is None or torch.equal(a, b) for a, b in zip(got[1], again[1]))
    assert got[0].dtype == torch.float64 and abs(got[0] - ref[0]) <= 1e-5 * abs(ref[0]) + 1e-6, (n, d, got[0], ref[0])
    worst["loss_rel"] = max(worst["loss_rel"], float(abs(got[0] - ref[0]) / abs(ref[0])))
    for g_ref, g_got in zip(ref[1], got[1]):
        if g_ref is None:
            assert g_got is None
            continue
        assert g_got.dtype == torch.bfloat16
        diff, top = float((g_got.double() - g_ref).abs().max()), float(g_ref.abs().max())
        assert diff <= 8e-3 * top + 1e-7, (n, d, diff, top)  # n = 1: the loss and its gradients are 0
        worst["grad_of_max"] = max(worst["grad_of_max"], diff / top if top > 0 else 0.0)
    assert abs(got[2] - ref[2]) <= 1e-4 * abs(ref[2]) + 1e-5, (n, d, got[2], ref[2])
    worst["scale_rel"] = max(worst["scale_rel"], float(abs(got[2] - ref[2]) / abs(ref[2])))
print(json.dumps({"bf16_kernels": _core.similarity_bf16(), "calls": sorted(set(calls)), "worst": worst}))
"""


def _cpu_supports_bf16() -> bool:
    from galaxalign_batch import _core

    return bool(getattr(_core, "cpu_supports_bf16", lambda: False)())


@needs_core
@pytest.mark.parametrize("mode", ["1", "0"])
def test_bf16_inputs_match_reference(mode):
    """bf16 features: the AVX512-BF16 kernels (GALAXALIGN_CPU_BF16=1) and the float32 upcast (=0) against
    the float64 reference, same cases as float64/float32 above; every gradient, bitwise repeatable."""
    import json

    if mode == "1" and not _cpu_supports_bf16():
        pytest.skip("this CPU (or build) has no AVX512-BF16")
    env = dict(os.environ, GALAXALIGN_CPU_BF16=mode)
    env.pop("GALAXALIGN_CPU_ISA", None)
    result = subprocess.run([sys.executable, "-c", _BF16_CHECK, json.dumps(BF16_CASES)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if mode == "1":  # the bf16 kernels ran, forward and backward
        assert report["bf16_kernels"].startswith("x86-64-v4 + AVX512-BF16")
        assert report["calls"] == ["trimodal_loss_backward_bf16", "trimodal_loss_forward_bf16"]
    else:  # upcast to float32: the bf16 kernels never ran
        assert report["bf16_kernels"] == "" and report["calls"] == []


@needs_core
def test_bf16_switch_errors():
    code = "from galaxalign_batch import _core; print(repr(_core.similarity_bf16()))"
    bad = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GALAXALIGN_CPU_BF16="yes"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "GALAXALIGN_CPU_BF16 must be 0, 1 or auto" in bad.stderr
    forced = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GALAXALIGN_CPU_BF16="1"),
                            capture_output=True, text=True, timeout=60)
    if _cpu_supports_bf16():
        assert forced.returncode == 0 and "AVX512-BF16" in forced.stdout
    else:  # a forced path the CPU lacks is an error, never a silent fallback
        assert forced.returncode != 0 and "lacks AVX512-BF16" in forced.stderr
    # A forced lower instruction-set level means no AVX-512 code: auto leaves bf16 off under it.
    lower = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GALAXALIGN_CPU_ISA="v2", GALAXALIGN_CPU_BF16="auto"),
                           capture_output=True, text=True, timeout=60)
    assert lower.returncode == 0 and lower.stdout.strip() == "''"


@needs_core
def test_fused_is_bitwise_repeatable():
    """Threads own disjoint row/column bands in each wave (no races): reruns give identical bits."""
    feats = [x.float() for x in _features(1000, 40, seed=12)]
    ids = torch.randint(0, 6, (1000,), generator=torch.Generator().manual_seed(3))
    first = _loss_and_grads(feats, 25.0, ids, (1.0, 0.5, 1.5), "fused")
    for _ in range(4):
        again = _loss_and_grads(feats, 25.0, ids, (1.0, 0.5, 1.5), "fused")
        assert torch.equal(again[0], first[0]) and torch.equal(again[2], first[2])
        assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))


def test_missing_kernel_falls_back_or_errors(monkeypatch):
    from galaxalign_batch.ops import backends

    monkeypatch.setattr(backends, "module_for", lambda device: None)
    feats = _features(4, 3)
    s = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(ConfigError, match="no compiled kernel"):
        trimodal_contrastive_loss(*feats, s, impl="fused")
    auto = trimodal_contrastive_loss(*feats, s, impl="auto")
    assert auto.item() == pytest.approx(trimodal_contrastive_loss(*feats, s, impl="reference").item(), rel=1e-14)


@pytest.mark.parametrize("n,m,tile_mb", [(300, 700, "1"), (5, 1, None), (2000, 130, "1")])
def test_row_logsumexp_blocked_matches_reference(n, m, tile_mb, monkeypatch):
    """The rectangular row log-sum-exp (global negatives' building block), blocked over several tiles."""
    if tile_mb:
        monkeypatch.setenv("GALAXALIGN_TILE_MB", tile_mb)
    from galaxalign_batch.ops import row_logsumexp

    g = torch.Generator().manual_seed(n)
    a = torch.nn.functional.normalize(torch.randn(n, 33, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(m, 33, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    out = {}
    for impl in ("reference", "fused"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s = torch.tensor(13.0, dtype=torch.float64, requires_grad=True)
        lse = row_logsumexp(x, y, s, impl=impl)
        (lse * w).sum().backward()
        out[impl] = (lse.detach(), x.grad, y.grad, s.grad)
    for got, ref in zip(out["fused"], out["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    full = torch.logsumexp(13.0 * a @ b.T, dim=1)
    torch.testing.assert_close(out["fused"][0], full)


def test_row_logsumexp_float32_and_errors():
    from galaxalign_batch.errors import ConfigError
    from galaxalign_batch.ops import row_logsumexp

    a, b = torch.randn(10, 8), torch.randn(4, 8)
    assert row_logsumexp(a, b, 2.0).dtype == torch.float32
    torch.testing.assert_close(row_logsumexp(a, b, 2.0), torch.logsumexp(2.0 * a @ b.T, 1))
    with pytest.raises(ConfigError, match="same D"):
        row_logsumexp(a, torch.randn(4, 9), 1.0)
    with pytest.raises(ConfigError, match="impl"):
        row_logsumexp(a, b, 1.0, impl="fast")
