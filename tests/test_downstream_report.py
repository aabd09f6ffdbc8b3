"""`report`: one self-contained HTML file; confusion matrix from the simulated truth, or a note when unknown."""

from __future__ import annotations

import base64
import io
import re
import shutil

import numpy as np
import pytest
import torch

from galaxalign_batch.cli import main
from galaxalign_batch.downstream.classify import classify_store, scorer_from_checkpoint
from galaxalign_batch.downstream.report import write_report
from galaxalign_batch.store import EmbeddingStore, open_store


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A simulated survey embedded with an (untrained) tiny tri-modal checkpoint, in this process."""
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.encoder import load_encoder
    from galaxalign_batch.engine.prepare import prepare_tile
    from galaxalign_batch.model.checkpoint import save_model
    from galaxalign_batch.model.train import TrainConfig, build_model
    from galaxalign_batch.simulate import simulate_survey

    tmp = tmp_path_factory.mktemp("report")
    simulate_survey(tmp / "sky", bricks=2, size=512, seed=1)
    torch.manual_seed(0)
    ckpt = save_model(build_model(TrainConfig(data=str(tmp), out=str(tmp / "out"))), tmp / "model.safetensors")
    enc = load_encoder(str(ckpt))
    info = enc.describe()
    path = tmp / "sky.zarr"
    store = EmbeddingStore.create(path, info["dim"], attrs={"model": info["identity"], "vocabulary": info["vocabulary"],
                                                            "cutout_spec": info["cutout_spec"]})
    for ref in resolve_tiles([str(tmp / "sky")]):
        p = prepare_tile(ref, enc.spec)
        store.commit([(ref.name, dict(p.columns, embedding=enc.encode(p.pixels)), "")])
    store.finalize()
    unclassified = tmp / "plain.zarr"
    shutil.copytree(path, unclassified)
    classify_store(path, scorer_from_checkpoint(ckpt, open_store(path)))
    return {"tmp": tmp, "survey": tmp / "sky", "store": path, "plain": unclassified}


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


def _truth_accuracy(setup) -> tuple[float, int]:
    from galaxalign_batch.survey import layout, read_tractor

    s = open_store(setup["store"])
    keys = s.attrs["classification"]["classes"]
    truth = {}
    for brick in {str(t).rsplit("/", 1)[-1] for t in s.read("tile")}:  # tile keys are ROOT/coadd/AAA/BRICK
        cat = read_tractor(layout.tractor_path(setup["survey"], brick), primary_only=False)
        truth.update(zip(np.asarray(cat["object_id"]).astype(str), np.asarray(cat["true_class_key"]).astype(str)))
    ids = s.read("object_id").astype(object)
    label = s.read("label")
    pairs = [(keys.index(truth[i]), l) for i, l in zip(ids, label) if truth.get(i) in keys]
    t, p = np.array(pairs).T
    return float(np.mean(t == p)), len(pairs)


def test_report_is_self_contained_with_truth(setup, tmp_path):
    out = tmp_path / "report.html"
    summary = write_report(setup["store"], out, roots=[str(setup["survey"])], examples=3)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing loaded from outside the file: no scripts, stylesheets or images; the only links are the
    # examples' Legacy Survey viewer positions (followed by a click, never loaded by the page)
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page and "<link" not in page
    assert not re.search(r'href="(?!https://www\.legacysurvey\.org/viewer\?ra=[0-9.]+&amp;dec=-?[0-9.]+&amp;'
                         r'layer=ls-dr10&amp;zoom=16")', page)
    imgs = _images(page)
    assert all(i.startswith("data:image/png;base64,") for i in imgs)
    from PIL import Image

    for i in imgs:
        Image.open(io.BytesIO(base64.b64decode(i.split(",", 1)[1]))).verify()
    for section in ("Overview", "Classes", "Sky map", "Embedding space", "Examples per class", "Confusion matrix"):
        assert f"<h2>{section}</h2>" in page
    s = open_store(setup["store"])
    counts = np.bincount(s.read("label"), minlength=10)
    n_examples = int(np.minimum(counts, 3).sum())
    assert page.count('<div class="thumb"><img') == n_examples and "no tile" not in page
    assert page.count('href="https://www.legacysurvey.org/viewer?') == n_examples
    # figures: histogram, sky map, embedding map, confusion matrix + thumbnails
    assert len(imgs) == 4 + n_examples
    acc, n = _truth_accuracy(setup)
    assert summary.truth_rows == n > 50 and summary.accuracy == pytest.approx(acc)
    assert f"{acc:.4f}" in page and str(s.n_rows) in page
    assert re.search(r"outside the vocabulary \(not counted\): star: \d+", page)  # reported, not counted


def test_unknown_truth_missing_tiles_and_unclassified(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no default survey root (runs/sky) here
    out = tmp_path / "r.html"
    moved = setup["survey"].with_name("sky-moved")  # tile keys name the survey's folder: move it away
    setup["survey"].rename(moved)
    try:
        summary = write_report(setup["store"], out, examples=2)
    finally:
        moved.rename(setup["survey"])
    page = out.read_text()
    assert "Skipped: no truth available" in page and summary.accuracy is None
    assert "no tile" in page and any("could not be re-made" in n for n in summary.notes)
    summary = write_report(setup["plain"], out, roots=[str(setup["survey"])])
    page = out.read_text()
    assert not summary.classified and "not classified" in page and "<h2>Confusion matrix</h2>" not in page
    assert "<h2>Sky map</h2>" in page and len(_images(page)) == 2  # sky map + embedding map


def test_cli_report(setup, tmp_path, capsys, caplog):
    out = tmp_path / "r.html"
    assert main(["--no-progress", "report", "--store", str(setup["store"]), "--out", str(out),
                 "--survey", str(setup["survey"]), "--examples", "1"]) == 0
    assert "accuracy" in capsys.readouterr().out and out.is_file()
    assert main(["--no-progress", "report", "--store", str(tmp_path / "missing.zarr"), "--out",
                 str(tmp_path / "x.html")]) == 1
    assert not (tmp_path / "x.html").exists()
    assert any("no such store" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
