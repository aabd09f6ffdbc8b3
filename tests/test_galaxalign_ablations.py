"""Training options of the tri-modal ablations (issue 13): one schedule across stages, withheld classes."""

from __future__ import annotations

import csv

import pytest
from conftest import write_symbol_labelled
import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model import distributed as dist_mod
from galaxalign_batch.model import train as train_mod
from galaxalign_batch.model.train import TrainConfig, run_training
from galaxalign_batch.vocabulary import load_vocabulary

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STAMP = 48


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A small labelled set in the simulator's layout (class symbols painted as g, r, z flux plus noise)."""
    return write_symbol_labelled(tmp_path_factory.mktemp("sim"), {"train": 4, "val": 1, "test": 1}, STAMP)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), epochs_stage1=1, epochs_stage2=1, batch_size=8, lr=5e-4,
                max_steps_per_epoch=2, angular_size=12.0, symbol_bank=2, resume="no")
    base.update(kw)
    return TrainConfig(**base)


def _lr_per_epoch(out) -> list[tuple[str, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [(r["stage"], float(r["lr"])) for r in csv.DictReader(f)]


def test_schedule_offset_continues_the_curve():
    p = torch.nn.Parameter(torch.zeros(1))
    whole = train_mod._schedule(torch.optim.SGD([p], lr=1.0), 20, 0.1)
    lrs = []
    for _ in range(20):
        lrs.append(whole.get_last_lr()[0])
        whole.optimizer.step()
        whole.step()
    second = train_mod._schedule(torch.optim.SGD([p], lr=1.0), 20, 0.1, offset=12)
    assert second.get_last_lr()[0] == pytest.approx(lrs[12])
    second.optimizer.step()
    second.step()
    assert second.get_last_lr()[0] == pytest.approx(lrs[13])


def test_schedule_run_spans_both_stages_and_keeps_the_moments(labelled, tmp_path, monkeypatch):
    """Per stage, each stage's cosine ends at lr 0; with --schedule run stage 1 ends half-way down one curve and
    stage 2 starts with stage 1's AdamW moments for the shared weights (the new symbol encoder's fresh)."""
    run_training(_cfg(labelled, tmp_path / "stage"))
    per_stage = _lr_per_epoch(tmp_path / "stage")
    assert [s for s, _ in per_stage] == ["stage1", "stage2"]
    assert per_stage[0][1] == pytest.approx(0.0, abs=1e-12) and per_stage[1][1] == pytest.approx(0.0, abs=1e-12)

    carried = {}
    real_adamw = torch.optim.AdamW

    class Spy(real_adamw):
        def step(self, *a, **k):
            if "n" not in carried:  # the first step of each optimizer: how many parameters already have moments
                carried.setdefault("per_optimizer", []).append(sum(1 for g in self.param_groups for p in g["params"]
                                                                   if p in self.state))
                carried["n"] = True
            return super().step(*a, **k)

        def __init__(self, *a, **k):
            carried.pop("n", None)
            super().__init__(*a, **k)

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", Spy)
    run_training(_cfg(labelled, tmp_path / "run", schedule="run"))
    one = _lr_per_epoch(tmp_path / "run")
    assert one[0][1] > 1e-5 and one[1][1] == pytest.approx(0.0, abs=1e-12)
    assert carried["per_optimizer"][0] == 0 and carried["per_optimizer"][1] > 0


def test_withheld_classes_train_no_image_but_keep_symbols_and_text(labelled, tmp_path, monkeypatch):
    keys = load_vocabulary("galaxy10").keys
    withheld = ("barred_spiral", "edge_on_with_bulge")
    ids = {keys.index(k) for k in withheld}
    image_labels, extra_labels = [], []
    real_step, real_extra = dist_mod.step_gradients, train_mod._symbol_text_gradients

    def spy_step(model, batches, **kw):
        image_labels.extend(int(c) for mb in batches for c in mb.labels)
        return real_step(model, batches, **kw)

    def spy_extra(cfg, model, bank, prompts, labels, weight, *a):
        extra_labels.append(sorted(set(int(c) for c in labels)))
        return real_extra(cfg, model, bank, prompts, labels, weight, *a)

    monkeypatch.setattr(train_mod, "step_gradients", spy_step)
    monkeypatch.setattr(train_mod, "_symbol_text_gradients", spy_extra)
    run_training(_cfg(labelled, tmp_path / "tri", withhold_classes=withheld))
    assert image_labels and not ids & set(image_labels)
    assert extra_labels and all(labels == list(range(len(keys))) for labels in extra_labels)

    image_labels.clear()
    extra_labels.clear()
    run_training(_cfg(labelled, tmp_path / "it", mode="image-text", epochs=2, withhold_classes=withheld))
    assert image_labels and not ids & set(image_labels)
    assert extra_labels == []  # image-text has no symbol-text term to keep them in

    with pytest.raises(ConfigError, match="not a class"):
        run_training(_cfg(labelled, tmp_path / "bad", withhold_classes=("spiral",)))
    with pytest.raises(ConfigError, match="schedule"):
        _cfg(labelled, tmp_path / "bad", schedule="cosine")
