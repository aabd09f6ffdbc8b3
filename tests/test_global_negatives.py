"""Global negatives across workers and gradient accumulation are exact: N workers x B == 1 x N*B.

Two gloo workers on loopback (``model.distributed.launch_local``, torch.distributed without Ray),
float64 throughout: the workers' mean loss and the averaged parameter gradients equal those of one
process holding the whole global batch, for the reference and the fused loss, with class-aware
positives spanning the workers; ``accum_steps`` micro-batches equal one batch of their union.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from galaxalign_batch.model import distributed as dist_mod
from galaxalign_batch.model.distributed import MicroBatch, launch_local, step_gradients
from galaxalign_batch.model.loss import contrastive_loss
from galaxalign_batch.model.train import TrainConfig, build_model
from galaxalign_batch.ops import trimodal_contrastive_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")

WEIGHTS = (1.0, 0.5, 0.8)   # all three pairs, unequal weights
GLOBAL = 32                 # items of the global batch


# ---------------------------------------------------------------------------------------------- the loss alone

def _features(n: int = GLOBAL, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {k: F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for k in ("image", "text", "symbol")}
    return feats, torch.randint(0, 5, (n,), generator=g)  # 5 classes in 32 items: positives on both workers


LOSS_CASES = [(impl, class_aware, bounds, "global") for impl in ("reference", "fused") for class_aware in (True, False)
              for bounds in ((0, 16, 32), (0, 11, 32))] + [("reference", True, (0, 16, 32), "local")]


def _loss_worker(rank, size, impl, bounds, class_aware, negatives):
    feats, ids = _features()
    rows = slice(bounds[rank], bounds[rank + 1])
    own = {k: v[rows].clone().requires_grad_() for k, v in feats.items()}
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(own["image"], own["text"], own["symbol"], scale, ids[rows] if class_aware else None,
                            WEIGHTS, impl=impl, negatives=negatives)
    loss.backward()
    return {"loss": loss.item(), "grads": {k: v.grad for k, v in own.items()}, "grad_scale": scale.grad.item()}


def _all_loss_cases(rank, size):
    return {(impl, class_aware, bounds, negatives): _loss_worker(rank, size, impl, bounds, class_aware, negatives)
            for impl, class_aware, bounds, negatives in LOSS_CASES}


@pytest.fixture(scope="module")
def loss_runs():
    """Every case of LOSS_CASES on one group of 2 gloo workers (one start-up): {case: [rank 0, rank 1]}."""
    out = launch_local(_all_loss_cases, 2)
    return {case: [o[case] for o in out] for case in LOSS_CASES}


def _one_process(impl: str, class_aware: bool):
    feats, ids = _features()
    full = {k: v.clone().requires_grad_() for k, v in feats.items()}
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    loss = trimodal_contrastive_loss(full["image"], full["text"], full["symbol"], scale, ids if class_aware else None,
                                     WEIGHTS, impl=impl)
    loss.backward()
    return loss.item(), {k: v.grad for k, v in full.items()}, scale.grad.item()


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("class_aware", [True, False], ids=["class-positives", "pair-positives"])
def test_global_negatives_loss_and_feature_gradients(loss_runs, impl, class_aware):
    loss, grads, grad_scale = _one_process("reference", class_aware)
    for bounds in ((0, 16, 32), (0, 11, 32)):  # equal halves, and 11 + 21 items
        out = loss_runs[(impl, class_aware, bounds, "global")]
        # mean of the workers' losses = the loss of the global batch
        assert np.mean([o["loss"] for o in out]) == pytest.approx(loss, rel=1e-13, abs=1e-13)
        # each worker's feature gradients (its own loss plus what the others sent back) are N x the global ones
        for k in grads:
            got = torch.cat([o["grads"][k] for o in out]) / 2
            torch.testing.assert_close(got, grads[k], rtol=1e-11, atol=1e-14)
        assert np.mean([o["grad_scale"] for o in out]) == pytest.approx(grad_scale, rel=1e-12, abs=1e-14)


def test_global_negatives_differ_from_local_negatives(loss_runs):
    out = loss_runs[("reference", True, (0, 16, 32), "local")]
    feats, ids = _features()
    halves = [trimodal_contrastive_loss(*(feats[k][r] for k in ("image", "text", "symbol")), 7.5, ids[r], WEIGHTS).item()
              for r in (slice(0, 16), slice(16, 32))]
    assert [o["loss"] for o in out] == pytest.approx(halves, rel=1e-13)  # each worker only saw its own batch
    global_loss, _, _ = _one_process("reference", True)
    assert abs(np.mean(halves) - global_loss) > 0.05  # 16 negatives per item are not 32


# ---------------------------------------------------------------------------------------------- the whole model

def _tiny_model(tmp_path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TrainConfig(data="unused", out=str(tmp_path)))
    model.init_symbol_encoder()  # stage 2: three encoders, three pairs
    model.set_trainable("all")
    with torch.no_grad():
        model.clip.logit_scale.fill_(np.log(1 / 0.1))
    return model.double()


def _inputs(model, n: int = GLOBAL):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64)
    symbols = torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64)
    texts = [model.vocabulary.prompts(int(c))[0] for c in labels]
    return labels, images, symbols, texts


def _micro(model, inputs, rows) -> MicroBatch:
    labels, images, symbols, texts = inputs
    picked = [texts[i] for i in range(len(texts))[rows]]
    uniq = sorted(set(picked))
    return MicroBatch(images=images[rows], labels=labels[rows], symbols=symbols[rows], tokens=model.tokenize(uniq),
                      inverse=torch.tensor([uniq.index(t) for t in picked]))


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _step(model, batches, impl):
    model.zero_grad(set_to_none=True)
    loss = step_gradients(model, batches, weights=WEIGHTS, impl=impl)
    return loss.item(), _grads(model)


MODEL_CASES = (("reference", 1), ("fused", 1), ("fused", 2))  # (impl, accumulation steps per worker)


def _model_worker(rank, size, state_path):
    model = _tiny_model(state_path.parent)
    if rank == 0:
        model.load_state_dict(torch.load(state_path, weights_only=True))
    else:  # different weights on rank 1 ...
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    dist_mod.broadcast_parameters(model)  # ... replaced by rank 0's, as at the start of every stage
    inputs = _inputs(model)
    results = {}
    for impl, accum in MODEL_CASES:
        per = GLOBAL // size // accum
        first = rank * GLOBAL // size
        batches = [_micro(model, inputs, slice(first + k * per, first + (k + 1) * per)) for k in range(accum)]
        results[(impl, accum)] = _step(model, batches, impl)
    return results


@pytest.fixture(scope="module")
def reference_step(tmp_path_factory):
    """The tiny model in float64 and one process's loss and gradients on the 32 items."""
    tmp = tmp_path_factory.mktemp("gn")
    model = _tiny_model(tmp)
    state = tmp / "state.pt"
    torch.save(model.state_dict(), state)
    loss, grads = _step(model, [_micro(model, _inputs(model), slice(0, GLOBAL))], "reference")
    return model, state, loss, grads


@pytest.fixture(scope="module")
def model_runs(reference_step):
    """MODEL_CASES on one group of 2 gloo workers, each holding 16 of the 32 items: [rank 0, rank 1]."""
    return launch_local(_model_worker, 2, reference_step[1])


def _assert_same_step(got, expected):
    loss, grads = got
    ref_loss, ref_grads = expected
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        scale = max(g.abs().max().item(), 1e-30)
        assert (grads[k] - g).abs().max().item() <= 1e-9 * scale, k


@pytest.mark.slow  # fast tier: make test; everything: make test-all (CI)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_global_negatives_two_workers_equal_one_process(reference_step, model_runs, impl):
    _, _, loss, grads = reference_step
    out = [r[(impl, 1)] for r in model_runs]
    assert out[0][0] == out[1][0]  # the reported loss is the global one on both workers
    for rank_result in out:  # gradients averaged: every worker holds the global batch's
        _assert_same_step(rank_result, (loss, grads))


@pytest.mark.slow  # fast tier: make test; everything: make test-all (CI)
def test_global_negatives_two_workers_with_accumulation(reference_step, model_runs):
    _, _, loss, grads = reference_step
    for rank_result in model_runs:  # 2 workers x 2 micro-batches x 8
        _assert_same_step(rank_result[("fused", 2)], (loss, grads))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_global_negatives_accumulation_equals_one_batch(reference_step, impl):
    model, _, loss, grads = reference_step
    inputs = _inputs(model)
    batches = [_micro(model, inputs, slice(0, 16)), _micro(model, inputs, slice(16, 32))]
    _assert_same_step(_step(model, batches, impl), (loss, grads))


def test_global_negatives_accumulation_replays_dropout(monkeypatch, tmp_path):
    """With patch dropout on, the second pass of each micro-batch draws the masks of its first pass."""
    from open_clip.transformer import PatchDropout

    torch.manual_seed(0)
    model = build_model(TrainConfig(data="unused", out=str(tmp_path), mode="image-text"))
    model.clip.visual.patch_dropout = PatchDropout(0.5)
    model.train()
    seen = []
    real = dist_mod.encode

    def spy(m, mb):
        out = real(m, mb)
        seen.append(out["image"].detach().clone())
        return out

    monkeypatch.setattr(dist_mod, "encode", spy)
    inputs = _inputs(model, 16)
    batches = [_micro(model, inputs, slice(0, 8)), _micro(model, inputs, slice(8, 16))]
    for mb in batches:
        mb.images, mb.symbols = mb.images.float(), None
    step_gradients(model, batches, weights=(1.0, 0.0, 0.0))
    assert len(seen) == 4  # two passes over two micro-batches
    torch.testing.assert_close(seen[2], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[3], seen[1], rtol=0, atol=0)
    assert not torch.equal(seen[0], real(model, batches[0])["image"].detach())  # the dropout is random
