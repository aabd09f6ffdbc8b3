"""Labels to training: `label --export` -> `train --data labels.csv --store STORE` (cutouts re-made from the
store's tiles) -> embed again with the new checkpoint -> `fewshot` and `label` on the new store (issue 16)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from galaxalign_batch.cli import main
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.data import load_dataset
from galaxalign_batch.preprocess import CutoutSpec
from galaxalign_batch.store import EmbeddingStore, open_store
from galaxalign_batch.vocabulary import load_vocabulary

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory):
    """A simulated brick embedded with the tiny model, and 6 galaxies of each of 3 true classes labelled
    through the labelling database and exported by `label --export`."""
    from conftest import simulated_sky_store

    from galaxalign_batch.labelling.db import LabelDB
    from galaxalign_batch.labelling.task import TaskPaths
    from galaxalign_batch.survey import layout, read_tractor

    tmp = tmp_path_factory.mktemp("labels-train")
    path = simulated_sky_store(tmp, seed=3)
    store = open_store(path)
    ids = np.asarray(store.read("object_id")).astype(object).astype(str)
    truth = {}
    for brick in {str(t).rsplit("/", 1)[-1] for t in store.read("tile")}:
        cat = read_tractor(layout.tractor_path(tmp / "sky", brick), primary_only=False)
        truth.update(zip(np.asarray(cat["object_id"]).astype(str), np.asarray(cat["true_class_key"]).astype(str)))
    classes = ["round_smooth", "edge_on_no_bulge", "barred_spiral"]
    picked = {c: [i for i in ids if truth.get(i) == c][:6] for c in classes}
    assert all(len(v) == 6 for v in picked.values()), {c: len(v) for c, v in picked.items()}
    db = LabelDB(TaskPaths.for_task(str(path), "morph").db, "morph", classes, str(path))
    row_of = {oid: r for r, oid in enumerate(ids)}
    for c, oids in picked.items():
        for oid in oids:
            db.add_label("s1", oid, row_of[oid], "class", c)
    star = next(i for i in ids if truth.get(i) not in classes)
    db.add_label("s1", star, row_of[star], "artefact", None)  # a mark: not exported
    db.close()
    out = tmp / "morph.csv"
    assert main(["--no-progress", "label", "--store", str(path), "--task", "morph", "--export", str(out)]) == 0
    return {"tmp": tmp, "store": path, "labels": out, "picked": picked, "row_of": row_of}


def test_exported_labels_are_cut_from_the_stores_tiles(labelled_store):
    rows = list(csv.DictReader(labelled_store["labels"].open()))
    assert len(rows) == 18 and set(rows[0]) >= {"object_id", "label"}
    vocab = load_vocabulary("galaxy10")
    spec = CutoutSpec(angular_size=32.0, out_size=64, stretch="lupton")
    data = load_dataset(labelled_store["labels"], vocab, spec=spec, seed=0, val_fraction=0.2, test_fraction=0.2,
                        store=labelled_store["store"])
    assert data.description["kind"] == "store-labels" and data.description["objects"] == 18
    assert data.description["counts"] == {"round_smooth": 6, "barred_spiral": 6, "edge_on_no_bulge": 6}
    every = data.split("all")
    assert len(every) == 18 and {len(data.split(s)) for s in ("val", "test")} == {3}
    # each image is its object's cutout re-made from the tile with the run's spec, with the object's class
    store = open_store(labelled_store["store"])
    cut = store.cutouts([labelled_store["row_of"][o] for c in labelled_store["picked"].values() for o in c], spec,
                        strict=True)
    by_class = {vocab.index(c): [cut[labelled_store["row_of"][o]] for o in oids]
                for c, oids in labelled_store["picked"].items()}
    for img, y in zip(every.images, every.labels):
        assert any(np.array_equal(np.asarray(img, np.float32), np.asarray(ref, np.float32).astype(np.float16)
                                  .astype(np.float32)) for ref in by_class[int(y)])
    # with the store's own spec the pictures are those the store's embeddings were made from
    from galaxalign_batch.engine.encoder import load_encoder

    own = load_dataset(labelled_store["labels"], vocab, spec=store.cutout_spec, store=labelled_store["store"],
                       val_fraction=0.2, test_fraction=0.2).split("all")
    enc = load_encoder("tiny")
    oids = [o for c in labelled_store["picked"].values() for o in c]
    stored = store.read("embedding", np.array(sorted(labelled_store["row_of"][o] for o in oids))).astype(np.float32)
    fresh = enc.encode(np.asarray(own.images, np.float32))
    assert np.abs(fresh @ stored.T).max(axis=1).min() > 0.999  # every picture is one of the stored embeddings'


def test_refusals(labelled_store, tmp_path):
    vocab = load_vocabulary("galaxy10")
    spec = CutoutSpec(out_size=64)
    with pytest.raises(ConfigError, match="give the store they are from with --store"):
        load_dataset(labelled_store["labels"], vocab, spec=spec)
    bad = tmp_path / "rings.csv"
    bad.write_text("object_id,label\n" + "".join(f"{o},ring\n" for o in labelled_store["picked"]["round_smooth"])
                   + "".join(f"{o},no-ring\n" for o in labelled_store["picked"]["barred_spiral"]))
    with pytest.raises(ConfigError, match=r"label\(s\) 'no-ring', 'ring' are not classes of the vocabulary"):
        load_dataset(bad, vocab, spec=spec, store=labelled_store["store"])
    missing = tmp_path / "missing.csv"
    missing.write_text("object_id,label\nno/such/1,round_smooth\n10000/x/2,barred_spiral\n")
    with pytest.raises(ConfigError, match="2 of 2 object id"):
        load_dataset(missing, vocab, spec=spec, store=labelled_store["store"])
    with pytest.raises(ConfigError, match="with --store, --data is a label file"):
        load_dataset(tmp_path, vocab, spec=spec, store=labelled_store["store"])
    (tmp_path / "spec.json").write_text(json.dumps({"labels": "x.csv"}))
    with pytest.raises(ConfigError, match="'labels' .* and 'store'"):
        load_dataset(tmp_path / "spec.json", vocab, spec=spec)


# trains three times a few steps, embeds the brick again, fits a head: ~20 s on 2 shared cores
def test_label_train_reembed_label_round_trip(labelled_store, tmp_path):
    from galaxalign_batch.downstream.classify import checkpoint_identity
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.encoder import load_encoder
    from galaxalign_batch.engine.prepare import prepare_tile
    from galaxalign_batch.model.checkpoint import read_info

    # 1. fine-tune on the exported labels (a data spec naming the store, relative paths)
    spec_file = labelled_store["tmp"] / "data.json"
    spec_file.write_text(json.dumps({"labels": "morph.csv", "store": "sky.zarr"}))
    run = tmp_path / "run"
    assert main(["--no-progress", "train", "--data", str(spec_file), "--out", str(run), "--mode", "image-text",
                 "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "--val-fraction", "0.2",
                 "--test-fraction", "0.2", "--threads", "1", "--device", "cpu"]) == 0
    info = read_info(run / "model.safetensors")
    assert info["data"]["kind"] == "store-labels" and info["data"]["objects"] == 18
    assert info["data"]["store_model"]["id"] == open_store(labelled_store["store"]).attrs["model"]["id"]
    # the same with --data labels.csv --store STORE resumes nothing and trains the same way
    run2 = tmp_path / "run2"
    assert main(["--no-progress", "train", "--data", str(labelled_store["labels"]), "--store",
                 str(labelled_store["store"]), "--out", str(run2), "--mode", "image-text", "--epochs", "1",
                 "--batch-size", "8", "--max-steps-per-epoch", "2", "--val-fraction", "0.2", "--test-fraction", "0.2",
                 "--threads", "1", "--device", "cpu"]) == 0
    assert read_info(run2 / "model.safetensors")["weights_digest"] == info["weights_digest"]
    # evaluate --stretch on the label file: its store comes from the checkpoint, its objects are re-cut in gz-decals
    ev = tmp_path / "eval-gz"
    assert main(["--no-progress", "evaluate", "--checkpoints", str(run2 / "model.safetensors"), "--data",
                 str(labelled_store["labels"]), "--out", str(ev), "--stretch", "gz-decals", "--device", "cpu"]) == 0
    assert json.loads((ev / "metrics.json").read_text())[0]["stretch"] == "gz-decals"

    # 2. embed the same tiles again with the fine-tuned checkpoint
    enc = load_encoder(str(run / "model.safetensors"))
    d = enc.describe()
    new = tmp_path / "sky2.zarr"
    s2 = EmbeddingStore.create(new, d["dim"], attrs={"model": d["identity"], "vocabulary": d["vocabulary"],
                                                    "cutout_spec": d["cutout_spec"],
                                                    "survey_roots": [str(labelled_store["tmp"] / "sky")]})
    for ref in resolve_tiles([str(labelled_store["tmp"] / "sky")]):
        p = prepare_tile(ref, enc.spec)
        s2.commit([(ref.name, dict(p.columns, embedding=enc.encode(p.pixels)), "")])
    s2.finalize()
    assert open_store(new).attrs["model"]["id"] == checkpoint_identity(run / "model.safetensors")["id"]

    # 3. the exported labels name the same objects in the new store: a few-shot head, and labelling there
    assert main(["--no-progress", "fewshot", "--store", str(new), "--labels", str(labelled_store["labels"]),
                 "--out", str(tmp_path / "morph.head.safetensors"), "--apply"]) == 0
    assert "fewshot/morph/probs" in open_store(new)
    # and the circle closes: train again from the new store's labels
    assert main(["--no-progress", "train", "--data", str(labelled_store["labels"]), "--store", str(new), "--out",
                 str(tmp_path / "run3"), "--model", str(run / "model.safetensors"), "--mode", "image-text",
                 "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1", "--val-fraction", "0.2",
                 "--test-fraction", "0.2", "--threads", "1", "--device", "cpu"]) == 0
    torch.set_num_threads(1)


def test_stretch_augment_cuts_each_labelled_object_in_both_stretches(labelled_store):
    """``train --stretch-augment`` on store labels: the train split carries each object's cutout in the other
    stretch too, from the same tile reads, row for row; val/test only the run's stretch."""
    vocab = load_vocabulary("galaxy10")
    spec = CutoutSpec(angular_size=32.0, out_size=64, stretch="lupton")
    gz = CutoutSpec(angular_size=32.0, out_size=64, stretch="gz-decals")
    data = load_dataset(labelled_store["labels"], vocab, spec=spec, seed=0, val_fraction=0.2, test_fraction=0.2,
                        store=labelled_store["store"], stretch_augment=("gz-decals",))
    assert data.description["stretch_augment"] == ["gz-decals"]
    train = data.split("train")
    assert len(train.alternates) == 1 and train.alternates[0].shape == train.images.shape
    assert data.split("val").alternates == () and data.split("test").alternates == ()
    store = open_store(labelled_store["store"])
    rows = sorted(labelled_store["row_of"][o] for c in labelled_store["picked"].values() for o in c)
    as_f16 = lambda a: np.asarray(a, np.float32).astype(np.float16)  # noqa: E731
    lup = {r: as_f16(p) for r, p in store.cutouts(rows, spec, strict=True).items()}
    gzc = {r: as_f16(p) for r, p in store.cutouts(rows, gz, strict=True).items()}
    for img, alt in zip(train.images, train.alternates[0]):
        (row,) = [r for r in rows if np.array_equal(lup[r], img)]
        assert np.array_equal(gzc[row], alt)
        assert not np.array_equal(img, alt)
