"""Training and evaluation: class ids reach the loss, resume, the three modes, Ray Train, bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import kill_a_ray_worker_when, write_symbol_labelled
import torch
from PIL import Image

from galaxalign_batch.cli import main
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model import train as train_mod
from galaxalign_batch.model.checkpoint import find_latest, load_checkpoint, read_info
from galaxalign_batch.model.data import load_dataset, stratified_split
from galaxalign_batch.model.launch import train
from galaxalign_batch.model.train import TrainConfig, build_model, run_training
from galaxalign_batch.preprocess import CutoutSpec
from galaxalign_batch.vocabulary import load_vocabulary

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: one torch thread per module

STAMP = 48           # pixels of the fake stamps (0.262"/px: 12.6")
ANGULAR = 12.0       # arcsec of the training cutouts


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A small labelled set in the simulator's layout: the class symbols painted as g, r, z flux plus noise."""
    return write_symbol_labelled(tmp_path_factory.mktemp("sim"), {"train": 4, "val": 1, "test": 2}, STAMP)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), epochs_stage1=1, epochs_stage2=1, batch_size=8, lr=5e-4,
                max_steps_per_epoch=1, angular_size=ANGULAR, symbol_bank=2)
    base.update(kw)
    return TrainConfig(**base)


def test_simulated_set_goes_through_make_cutouts(labelled):
    spec = CutoutSpec(angular_size=ANGULAR, out_size=64)
    ds = load_dataset(labelled, load_vocabulary("galaxy10"), spec=spec)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 40, "val": 10, "test": 20}
    train_set = ds.split("train")
    assert train_set.images.shape == (40, 3, 64, 64)
    assert 0 <= train_set.images.min() and train_set.images.max() <= 1 and train_set.images.max() > 0.3
    from galaxalign_batch.preprocess import make_cutouts

    with np.load(labelled / "labelled" / "train.npz") as z:
        first = z["flux"][0]
    ref = make_cutouts(first, None, np.array([(STAMP - 1) / 2]), np.array([(STAMP - 1) / 2]), 0.262, spec).pixels[0]
    np.testing.assert_allclose(train_set.images[0].astype(np.float32), ref, atol=1e-3)


def test_stretch_augment_alternates_are_drawn_per_row(labelled, tmp_path):
    """``--stretch-augment``: the train split is also cut in the other stretch (val/test are not); a batch with a
    generator draws each row's version at random, without one it is the run's stretch; pictures are refused."""
    spec = CutoutSpec(angular_size=ANGULAR, out_size=32)
    vocab = load_vocabulary("galaxy10")
    ds = load_dataset(labelled, vocab, spec=spec, stretch_augment=("gz-decals",))
    train_set = ds.split("train")
    assert ds.description["stretch_augment"] == ["gz-decals"] and ds.split("val").alternates == ()
    (alt,) = train_set.alternates
    gz = load_dataset(labelled, vocab, spec=CutoutSpec(angular_size=ANGULAR, out_size=32, stretch="gz-decals"))
    np.testing.assert_array_equal(alt, gz.split("train").images)
    index = np.arange(len(train_set))
    np.testing.assert_array_equal(train_set.batch(index).numpy(), train_set.images.astype(np.float32))
    got = train_set.batch(index, np.random.default_rng(0)).numpy()
    from_alt = np.array([np.array_equal(g, a.astype(np.float32)) for g, a in zip(got, alt)])
    from_own = np.array([np.array_equal(g, a.astype(np.float32)) for g, a in zip(got, train_set.images)])
    assert (from_alt | from_own).all() and 0.2 < from_alt.mean() < 0.8
    sub = train_set.subset(index[:5])
    np.testing.assert_array_equal(sub.alternates[0], alt[:5])
    for i in range(3):
        _png(tmp_path / "pics" / "round_smooth" / f"{i}.png", 10 * i)
    with pytest.raises(ConfigError, match="already stretched"):
        load_dataset(tmp_path / "pics", vocab, spec=spec, stretch_augment=("gz-decals",))
    for bad in (("lupton",), ("none",), ("asinh", "asinh")):
        with pytest.raises(ConfigError, match="--stretch-augment"):
            _cfg(labelled, tmp_path / "x", stretch_augment=bad)


def test_a_run_with_stretch_augment_records_it_and_trains_on_both(labelled, tmp_path, monkeypatch):
    seen = []
    real = train_mod.ImageSet.batch

    def spy(self, index, rng=None):
        seen.append((len(self.alternates), rng is not None))
        return real(self, index, rng)

    monkeypatch.setattr(train_mod.ImageSet, "batch", spy)
    out = tmp_path / "aug"
    run_training(_cfg(labelled, out, stretch_augment=("gz-decals", "asinh"), epochs_stage2=0))
    info = read_info(out / "model.safetensors")
    assert info["training"]["stretch_augment"] == ["gz-decals", "asinh"]
    assert info["data"]["stretch_augment"] == ["gz-decals", "asinh"]
    assert (2, True) in seen  # the training batches draw among three versions
    with pytest.raises(ConfigError, match="different run.*stretch_augment"):  # without it: another run
        run_training(_cfg(labelled, out, epochs_stage2=0))


def test_training_passes_class_ids_to_the_loss(labelled, tmp_path, monkeypatch):
    from galaxalign_batch.model import loss as loss_mod

    calls = []
    real = loss_mod.trimodal_contrastive_loss

    def spy(image, text, symbol, logit_scale, class_ids=None, weights=(1, 1, 1), impl="auto"):
        calls.append({"class_ids": None if class_ids is None else class_ids.clone(), "weights": tuple(weights),
                      "symbol": symbol is not None, "impl": impl, "B": image.shape[0]})
        return real(image, text, symbol, logit_scale, class_ids=class_ids, weights=weights, impl=impl)

    monkeypatch.setattr(loss_mod, "trimodal_contrastive_loss", spy)  # what one worker's loss is
    summary = run_training(_cfg(labelled, tmp_path, loss="reference", stage1_weights=(1.0, 0.0, 0.5)))
    assert len(calls) == 2  # one step in each stage
    s1, s2 = calls
    for c in calls:
        assert c["class_ids"] is not None and c["class_ids"].shape == (c["B"],) and c["impl"] == "reference"
        assert c["class_ids"].dtype == torch.int64 and set(c["class_ids"].tolist()) <= set(range(10))
    assert s1["weights"] == (1.0, 0.0, 0.5) and s1["symbol"]
    assert s2["weights"] == (1.0, 1.0, 1.0)
    # the batch's class ids are the labels of the rows the first step took
    order = np.random.default_rng([0, 0]).permutation(40)[:8]
    ds = load_dataset(labelled, load_vocabulary("galaxy10"), spec=CutoutSpec(angular_size=ANGULAR, out_size=64))
    assert s1["class_ids"].tolist() == ds.split("train").labels[order].tolist()
    assert summary["epochs"] == 2


def test_trimodal_run_writes_everything_and_resumes(labelled, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(labelled, out)
    first = train(cfg)
    assert first["epochs"] == 2 and set(first["val_accuracy"]) == {"text", "symbol", "combined"}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["stage1", "stage2"] and all(r["val_acc_text"] for r in rows)
    info = read_info(out / "model.safetensors")
    assert info["has_symbol_encoder"] and info["stage"] == "stage2" and info["training"]["mode"] == "trimodal"
    assert not read_info(out / "model_stage1.safetensors")["has_symbol_encoder"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    final = load_checkpoint(out / "model.safetensors")

    # an interrupted run: stage 2 never finished; the rerun resumes from epoch 1 and redoes exactly epoch 2
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    (out / "model.safetensors").unlink()
    resumed = train(cfg)
    assert resumed["epochs"] == 2
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    again = load_checkpoint(out / "model.safetensors")
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(again.encode_images(x), final.encode_images(x), atol=1e-5, rtol=1e-4)

    with pytest.raises(ConfigError, match="different run"):
        run_training(_cfg(labelled, out, batch_size=4, resume="yes"))

    # the newest checkpoint damaged on disk after it was renamed into place: one line saying what to do,
    # and doing it (deleting that folder) resumes from the one before
    for name in ("train_state.pt", "model.safetensors"):
        damaged = out / "checkpoints" / "epoch_0002" / name
        whole = damaged.read_bytes()
        damaged.write_bytes(whole[: len(whole) // 3])
        with pytest.raises(ConfigError, match=r"epoch_0002(/model.safetensors)?: (unreadable training checkpoint|not a safetensors).*It is "
                                              r"the newest checkpoint of this run: delete .*epoch_0002 to resume from "
                                              r"the one before it, or start afresh with --no-resume"):
            run_training(cfg)
        damaged.write_bytes(whole)
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    assert train(cfg)["resumed_from"].endswith("epoch_0001")


@pytest.mark.parametrize("mode", ["image-text", "image-only"])
def test_baselines_same_budget(labelled, tmp_path, mode):
    summary = train(_cfg(labelled, tmp_path / mode, mode=mode))
    assert summary["epochs"] == 2 and summary["global_step"] == 2  # as many as trimodal's 1 + 1
    info = read_info(tmp_path / mode / "model.safetensors")
    assert info["mode"] == mode and not info["has_symbol_encoder"]
    assert (info["classifier_classes"] == 10) == (mode == "image-only")
    assert set(summary["val_accuracy"]) == ({"head"} if mode == "image-only" else {"text", "symbol", "combined"})


def test_image_only_trains_only_the_image_side(labelled, tmp_path):
    torch.manual_seed(0)
    before = build_model(_cfg(labelled, tmp_path, mode="image-only"))
    train(_cfg(labelled, tmp_path, mode="image-only"))
    after = load_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(before.clip.token_embedding.weight, after.clip.token_embedding.weight)
    assert torch.equal(before.clip.logit_scale, after.clip.logit_scale)
    assert not torch.equal(before.clip.visual.conv1.weight, after.clip.visual.conv1.weight)


def test_evaluate_compares_checkpoints(labelled, tmp_path):
    paths = []
    for mode in ("trimodal", "image-only"):
        train(_cfg(labelled, tmp_path / mode, mode=mode))
        paths.append(str(tmp_path / mode / "model.safetensors"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoints", *paths, "--names", "tri", "img", "--data", str(labelled),
                 "--out", str(out), "--k", "1", "5"]) == 0
    rows = json.loads((out / "table.json").read_text())
    assert [r["checkpoint"] for r in rows] == ["tri", "img"]
    assert rows[0]["acc_combined"] is not None and rows[1]["acc_head"] is not None and rows[1]["acc_text"] is None
    assert all(0 <= r["precision@5"] <= 1 and r["n_images"] == 20 for r in rows)
    md = (out / "table.md").read_text()
    assert "| tri | trimodal |" in md and "mAP@5" in md
    pngs = sorted(p.name for p in out.glob("confusion_*.png"))
    assert pngs == ["confusion_img_head.png", "confusion_tri_combined.png", "confusion_tri_symbol.png",
                    "confusion_tri_text.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics[0]["classification"]["text"]["per_class_recall"]) == 10
    from conftest import lease_holder

    with lease_holder(out) as other:  # one evaluation per folder: a second is refused, nothing rewritten
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert main(["evaluate", "--checkpoints", paths[0], "--data", str(labelled), "--out", str(out)]) == 1
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        assert other.poll() is None
    # --stretch: the same test galaxies cut in another stretch than the checkpoint's (lupton)
    assert rows[0]["stretch"] == "lupton" and metrics[0]["trained_stretches"] == ["lupton"]
    gz = tmp_path / "eval-gz"
    assert main(["evaluate", "--checkpoints", paths[0], "--names", "tri", "--data", str(labelled), "--out", str(gz),
                 "--stretch", "gz-decals"]) == 0
    got = json.loads((gz / "metrics.json").read_text())[0]
    assert got["stretch"] == "gz-decals" and "| tri | trimodal | gz-decals |" in (gz / "table.md").read_text()
    assert got["retrieval"] != metrics[0]["retrieval"]  # other pixels, other embeddings
    _png(tmp_path / "pics" / "round_smooth" / "0.png", 10)
    with pytest.raises(ConfigError, match="already stretched"):
        from galaxalign_batch.model.evaluate import evaluate_checkpoints

        evaluate_checkpoints([paths[0]], str(tmp_path / "pics"), tmp_path / "eval-pics", stretch="asinh")


# ---------------------------------------------------------------------------------------------- other sources

def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(path)


def test_folder_and_csv_sources(tmp_path):
    vocab = load_vocabulary("galaxy10")
    spec = CutoutSpec(out_size=32)
    for i in range(10):
        _png(tmp_path / "folders" / "round_smooth" / f"{i}.png", 10 * i)
        _png(tmp_path / "folders" / "barred spiral" / f"{i}.png", 200)  # a label text names the class too
    ds = load_dataset(tmp_path / "folders", vocab, spec=spec, seed=3)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 16, "val": 2, "test": 2}
    assert ds.split("train").images.shape == (16, 3, 32, 32) and ds.split("train").images.dtype == np.uint8
    assert set(ds.split("test").labels) == {vocab.index("round_smooth"), vocab.index("barred_spiral")}
    again = load_dataset(tmp_path / "folders", vocab, spec=spec, seed=3)
    np.testing.assert_array_equal(ds.split("test").images, again.split("test").images)  # seeded split

    lines = ["filepath,label"] + [f"folders/round_smooth/{i}.png,round_smooth" for i in range(5)] + \
            [f"folders/barred spiral/{i}.png,5" for i in range(5)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "list.csv", vocab, spec=spec, val_fraction=0.2, test_fraction=0.2)
    assert sorted(np.bincount(ds.split("all").labels, minlength=10)[[2, 5]]) == [5, 5]


def test_galaxy10_hdf5_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "g10.h5", "w") as f:
        f["images"] = rng.integers(0, 256, size=(30, 40, 40, 3), dtype=np.uint8)
        f["ans"] = np.repeat(np.arange(3), 10).astype(np.uint8)
    ds = load_dataset(tmp_path / "g10.h5", load_vocabulary("galaxy10"), spec=CutoutSpec(out_size=16))
    assert ds.description["kind"] == "hdf5"
    assert ds.split("train").images.shape == (24, 3, 16, 16)
    assert list(np.bincount(ds.split("test").labels)) == [1, 1, 1]
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["images"] = np.zeros((2, 8, 8, 3), np.uint8)
        f["ans"] = np.array([0, 11])
    with pytest.raises(ConfigError, match="label 11 at row 1"):
        load_dataset(tmp_path / "bad.h5", load_vocabulary("galaxy10"), spec=CutoutSpec(out_size=16))


def test_bad_input_gives_clear_errors(tmp_path, labelled):
    vocab = load_vocabulary("galaxy10")
    spec = CutoutSpec(out_size=16)
    _png(tmp_path / "a.png", 100)
    (tmp_path / "unknown.csv").write_text("filepath,label\na.png,round_smooth\na.png,spaceship\n")
    with pytest.raises(ConfigError, match=r"unknown.csv line 3: unknown class 'spaceship'"):
        load_dataset(tmp_path / "unknown.csv", vocab, spec=spec)
    (tmp_path / "missing.csv").write_text("filepath,label\na.png,round_smooth\nnope.png,merging\n")
    with pytest.raises(ConfigError, match=r"missing.csv line 3: image file not found: .*nope.png"):
        load_dataset(tmp_path / "missing.csv", vocab, spec=spec)
    _png(tmp_path / "dirs" / "spaceships" / "x.png", 1)
    with pytest.raises(ConfigError, match="folder of unknown class 'spaceships'"):
        load_dataset(tmp_path / "dirs", vocab, spec=spec)
    with pytest.raises(ConfigError, match="data not found"):
        load_dataset(tmp_path / "nowhere", vocab, spec=spec)
    # through the command line: one line on stderr, exit status 1
    assert main(["train", "--data", str(tmp_path / "unknown.csv"), "--out", str(tmp_path / "o")]) == 1
    with pytest.raises(SystemExit) as e:  # no --out: argparse's usage error
        main(["train", "--data", str(tmp_path / "unknown.csv")])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="--mode"):
        TrainConfig(data="x", out="y", mode="text-only")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no-label"])
def test_a_damaged_labelled_split_is_one_line_naming_the_file(labelled, tmp_path, damage, caplog):
    """A truncated ``train.npz`` used to end ``train`` with a zipfile traceback (BadZipFile is no OSError)."""
    data = tmp_path / "sim"
    shutil.copytree(labelled, data)
    split = next(data.rglob("train.npz"))
    raw = split.read_bytes()
    if damage == "truncated":  # a copy cut short: no zip directory
        split.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped":  # one byte of the compressed flux changed: CRC or inflate error
        with np.load(split) as z:
            flux, label = z["flux"], z["label"]
        np.savez_compressed(split, flux=flux, label=label)
        raw = bytearray(split.read_bytes())
        raw[200] ^= 0xFF
        split.write_bytes(bytes(raw))
    else:
        with np.load(split) as z:
            np.savez(split, flux=z["flux"])
    with pytest.raises(ConfigError, match=rf"{split.name}: cannot read flux/label \((BadZipFile|error|EOFError|KeyError|SyntaxError|TokenError)"):
        load_dataset(data, load_vocabulary(), spec=CutoutSpec(angular_size=ANGULAR, out_size=32))
    with caplog.at_level("ERROR"):
        assert main(["--no-progress", "train", "--data", str(data), "--out", str(tmp_path / "o"),
                     "--angular-size", str(ANGULAR)]) == 1
    assert any("train.npz: cannot read flux/label" in r.getMessage() for r in caplog.records)


def test_empty_or_tiny_splits_are_errors(tmp_path):
    for i in range(3):
        _png(tmp_path / "d" / "merging" / f"{i}.png", 50)
    with pytest.raises(ConfigError, match="split 'val' is empty"):
        run_training(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "o"), val_fraction=0.0))
    with pytest.raises(ConfigError, match="train split has 1 images: too few"):
        run_training(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "o"), val_fraction=0.34,
                                 test_fraction=0.34))


def test_stratified_split_is_per_class():
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    parts = stratified_split(labels, 0, 0.1, 0.2)
    assert [np.bincount(labels[parts["test"]]).tolist(), np.bincount(labels[parts["val"]]).tolist()] == \
        [[2, 4, 6], [1, 2, 3]]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(60))


# ---------------------------------------------------------------------------------------------- Ray Train

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # Ray start-up and two worker processes: ~30 s on a quiet 2-core machine
def test_ray_train_two_workers_take_a_real_step(labelled, tmp_path, ray_cluster):
    cfg = _cfg(labelled, tmp_path / "ray", mode="image-text", epochs=1, workers=2, batch_size=4)
    torch.manual_seed(cfg.seed)
    before = build_model(cfg)
    summary = train(cfg)
    assert summary["workers"] == 2 and summary["global_step"] == 1
    after = load_checkpoint(tmp_path / "ray" / "model.safetensors")
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert "clip.visual.conv1.weight" in changed and "clip.token_embedding.weight" in changed
    ray_ckpt = tmp_path / "ray" / "checkpoints" / "ray" / "train" / "epoch_0001"
    assert (ray_ckpt / "model.safetensors").is_file()
    assert find_latest(tmp_path / "ray" / "checkpoints") == ray_ckpt  # what a rerun would resume from
    with open(tmp_path / "ray" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


@pytest.mark.slow  # a Ray instance, two workers, a worker group restart: ~1-2 min on 2 shared cores
def test_two_workers_from_a_relative_path_survive_a_killed_worker(labelled, tmp_path):
    shutil.copytree(labelled, tmp_path / "sim")
    cmd = [sys.executable, "-m", "galaxalign_batch", "train", "--data", "sim", "--out", "run", "--workers", "2",
           "--mode", "image-text", "--epochs", "8", "--batch-size", "4", "--accum-steps", "2", "--lr", "5e-4",
           "--angular-size", str(ANGULAR), "--max-steps-per-epoch", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the fixture's
    env.update(OMP_NUM_THREADS="1", GALAXALIGN_PROGRESS="0")
    from galaxalign_batch.model.launch import newest_complete_checkpoint

    # Kill only once a checkpoint is *complete* in Ray's storage: a kill while Ray still copies it tears it,
    # and the restart then rightly starts afresh (test_restart_skips_a_checkpoint_torn...); epochs still to go.
    storage = tmp_path / "run" / "checkpoints" / "ray"
    rc, text = kill_a_ray_worker_when(cmd, tmp_path, env, tmp_path / "train.log",
                                      lambda: storage.is_dir() and newest_complete_checkpoint(storage) is not None)
    assert rc == 0, text[-3000:]
    run = tmp_path / "run"
    with open(run / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == [str(e) for e in range(1, 9)]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["epochs"] == 8 and summary["workers"] == 2
    assert summary["resumed_from"] and "epoch_000" in summary["resumed_from"]  # restarted from a checkpoint
    layout = {"global_batch": 16, "workers": 2, "per_worker_batch": 8, "micro_batch": 4, "accum_steps": 2,
              "negatives": "global"}
    assert summary["batch"] == layout and read_info(run / "model.safetensors")["batch"] == layout
    assert json.loads((run / "train_config.json").read_text())["batch"] == layout
    assert "effective global batch 16 = 2 worker(s) x 8 per worker (2 accumulation step(s) of 4), global negatives" in text


def test_restart_skips_a_checkpoint_torn_while_being_copied(labelled, tmp_path):
    from galaxalign_batch.model import checkpoint as ckpt
    from galaxalign_batch.model.launch import newest_complete_checkpoint

    model = build_model(_cfg(labelled, tmp_path, mode="image-text"))
    root = tmp_path / "checkpoints" / "ray" / "train"
    for epoch in (1, 2, 3):
        ckpt.save_training_checkpoint(root / f"epoch_{epoch:04d}", model, {"stage": "image-text"},
                                      {"epoch": epoch, "global_step": epoch})
    assert newest_complete_checkpoint(tmp_path / "checkpoints") == root / "epoch_0003"
    for epoch, name in ((3, ckpt.STATE_FILE), (2, ckpt.MODEL_FILE)):  # a copy cut short by a killed worker
        f = root / f"epoch_{epoch:04d}" / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert find_latest(tmp_path / "checkpoints") == root / "epoch_0003"  # present is not complete
    assert newest_complete_checkpoint(tmp_path / "checkpoints") == root / "epoch_0001"
    assert newest_complete_checkpoint(tmp_path / "nowhere") is None
    # the copy has only just begun: every file present, the state (or the weights) still 0 or 1 bytes long
    # (torch.load raises EOFError / UnpicklingError there, not the RuntimeError of a longer torn zip)
    for size in (0, 1):
        for name in (ckpt.STATE_FILE, ckpt.MODEL_FILE):
            ckpt.save_training_checkpoint(root / "epoch_0004", model, {"stage": "image-text"}, {"epoch": 4, "global_step": 4})
            f = root / "epoch_0004" / name
            f.write_bytes(f.read_bytes()[:size])
            assert newest_complete_checkpoint(tmp_path / "checkpoints") == root / "epoch_0001", (size, name)


def test_learning_rate_default_depends_on_the_starting_weights():
    assert TrainConfig(data="d", out="o").effective_lr == 1e-3                       # random weights
    assert TrainConfig(data="d", out="o", model="ViT-B-16", pretrained="w.bin").effective_lr == 1e-4
    assert TrainConfig(data="d", out="o", model="run/model.safetensors").effective_lr == 1e-4
    assert TrainConfig(data="d", out="o", lr=3e-4).effective_lr == 3e-4
    assert [s.lr for s in train_mod.plan_stages(TrainConfig(data="d", out="o", lr_stage2=2e-4))] == [1e-3, 2e-4]


# ---------------------------------------------------------------------------------------------- batch layout

def test_accumulation_and_batch_layout_in_log_config_and_checkpoint(labelled, tmp_path, caplog):
    out = tmp_path / "accum"
    cfg = _cfg(labelled, out, mode="image-text", epochs=1, batch_size=4, accum_steps=2, max_steps_per_epoch=None)
    with caplog.at_level(logging.INFO, logger="galaxalign_batch"):
        summary = train(cfg)
    layout = {"global_batch": 8, "workers": 1, "per_worker_batch": 8, "micro_batch": 4, "accum_steps": 2,
              "negatives": "global"}
    assert summary["batch"] == layout and summary["global_step"] == 40 // 8  # 40 train images, 8 per step
    assert json.loads((out / "train_config.json").read_text())["batch"] == layout
    info = read_info(out / "model.safetensors")
    assert info["batch"] == layout and info["training"]["accum_steps"] == 2
    assert "effective global batch 8 = 1 worker(s) x 8 per worker (2 accumulation step(s) of 4)" in caplog.text
    # a different accumulation is a different run: no silent resume
    with pytest.raises(ConfigError, match="accum_steps=2"):
        run_training(_cfg(labelled, out, mode="image-text", epochs=1, batch_size=4, accum_steps=1, resume="yes"))
    with pytest.raises(ConfigError, match="--accum-steps must be >= 1"):
        TrainConfig(data="d", out="o", accum_steps=0)
    assert TrainConfig(data="d", out="o", workers=4, batch_size=16, accum_steps=8).batch_layout()["global_batch"] == 512
