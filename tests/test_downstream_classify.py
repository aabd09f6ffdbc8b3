"""`classify`: store probabilities equal the model's own classify on the same cutouts; resume, idempotence, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from galaxalign_batch.cli import main
from galaxalign_batch.downstream.classify import PARTIAL, classify_store, scorer_from_checkpoint
from galaxalign_batch.downstream.common import classification_of
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore, ModelMismatchError, open_store


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _checkpoint(tmp, mode: str, seed: int):
    from galaxalign_batch.model.checkpoint import save_model
    from galaxalign_batch.model.train import TrainConfig, build_model

    torch.manual_seed(seed)
    model = build_model(TrainConfig(data=str(tmp), out=str(tmp / "out"), mode=mode))
    return save_model(model, tmp / f"{mode}-{seed}.safetensors")


def _embed(survey, ckpt, out):
    """What `embed` does, in this process: cutouts of every Tractor source, encoded, committed per tile."""
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.encoder import load_encoder
    from galaxalign_batch.engine.prepare import prepare_tile

    enc = load_encoder(str(ckpt))
    info = enc.describe()
    store = EmbeddingStore.create(out, info["dim"], attrs={"model": info["identity"], "vocabulary": info["vocabulary"],
                                                           "cutout_spec": info["cutout_spec"]}, rows_per_chunk=16)
    pixels, ids = [], []
    for ref in resolve_tiles([str(survey)]):
        p = prepare_tile(ref, enc.spec)
        store.commit([(ref.name, dict(p.columns, embedding=enc.encode(p.pixels)), "")])
        pixels.append(p.pixels)
        ids += list(p.columns["object_id"])
    store.finalize()
    return np.concatenate(pixels), ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from galaxalign_batch.simulate import simulate_survey

    tmp = tmp_path_factory.mktemp("classify")
    simulate_survey(tmp / "sky", bricks=2, size=512, seed=0)
    ckpt = _checkpoint(tmp, "trimodal", 0)
    pixels, ids = _embed(tmp / "sky", ckpt, tmp / "sky.zarr")
    return {"tmp": tmp, "survey": tmp / "sky", "ckpt": ckpt, "store": tmp / "sky.zarr", "pixels": pixels, "ids": ids}


@pytest.fixture(scope="module")
def model(setup):
    from galaxalign_batch.model.checkpoint import load_checkpoint

    return load_checkpoint(setup["ckpt"])


def _fresh(setup, name):
    path = setup["tmp"] / name
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(setup["store"], path)
    return path


def test_probs_equal_the_models_classify_on_the_same_cutouts(setup, model):
    path = _fresh(setup, "a.zarr")
    store = open_store(path)
    assert store.read("object_id").tolist() == setup["ids"]
    for method in ("combined", "text"):
        summary = classify_store(path, scorer_from_checkpoint(setup["ckpt"], store, method), force=True)
        assert summary.rows == len(setup["ids"]) and sum(summary.counts.values()) == summary.rows
        s = open_store(path)
        want = model.classify(setup["pixels"], method).numpy()
        probs = s.read("probs")
        np.testing.assert_allclose(probs, want, atol=2e-3, rtol=0)  # float16 embeddings in the store
        np.testing.assert_array_equal(s.read("label"), probs.argmax(1))
        np.testing.assert_array_equal(s.read("confidence"), probs.max(1))
        cls = classification_of(s)
        assert cls.method == method and cls.classes == model.vocabulary.keys and cls.rows == s.n_rows
        # the labels reproduce the model's own accuracy against the simulated truth
        from galaxalign_batch.survey import layout, read_tractor

        truth = {}
        for brick in ("1501p022", "1503p022"):
            cat = read_tractor(layout.tractor_path(setup["survey"], brick))
            truth.update(zip(np.asarray(cat["object_id"]).astype(str), np.asarray(cat["true_class"])))
        t = np.array([truth[i] for i in setup["ids"]])
        gal = t >= 0
        assert gal.sum() > 50
        agree = np.mean(s.read("label")[gal] == want.argmax(1)[gal])
        assert agree >= 0.97  # argmax ties under float16 rounding may flip a rare row
        acc_store = np.mean(s.read("label")[gal] == t[gal])
        acc_model = np.mean(want.argmax(1)[gal] == t[gal])
        assert abs(acc_store - acc_model) <= 1 - agree + 1e-9


def test_idempotent_and_resumable(setup):
    path = _fresh(setup, "b.zarr")
    store = open_store(path)
    scorer = scorer_from_checkpoint(setup["ckpt"], store)
    clean = _fresh(setup, "clean.zarr")
    classify_store(clean, scorer, batch_rows=16)

    calls = {"n": 0}
    inner = scorer.score

    def dying(st, start, stop):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return inner(st, start, stop)

    scorer.score = dying
    with pytest.raises(KeyboardInterrupt):
        classify_store(path, scorer, batch_rows=16)
    s = open_store(path)
    assert classification_of(s) is None and "probs" not in s.group  # nothing half-written is visible
    assert s.group[PARTIAL].attrs["rows_done"] == 32
    scorer.score = inner
    summary = classify_store(path, scorer, batch_rows=16)
    assert summary.resumed_from == 32 and PARTIAL not in open_store(path).group
    a, b = open_store(path), open_store(clean)
    for name in ("probs", "label", "confidence"):
        np.testing.assert_array_equal(a.read(name), b.read(name))
    again = classify_store(path, scorer)
    assert again.up_to_date and "already classified" in again.lines()[0]


def test_previous_classification_stays_until_the_new_one_is_complete(setup):
    path = _fresh(setup, "c.zarr")
    store = open_store(path)
    classify_store(path, scorer_from_checkpoint(setup["ckpt"], store, "combined"))
    before = open_store(path).read("probs")
    text = scorer_from_checkpoint(setup["ckpt"], store, "text")
    inner = text.score
    text.score = lambda st, a, b: (_ for _ in ()).throw(RuntimeError("killed")) if a >= 16 else inner(st, a, b)
    with pytest.raises(RuntimeError):
        classify_store(path, text, batch_rows=16)
    s = open_store(path)
    assert classification_of(s).method == "combined"
    np.testing.assert_array_equal(s.read("probs"), before)
    # another method starts over: the unfinished work of the text run is discarded, not mixed in
    summary = classify_store(path, scorer_from_checkpoint(setup["ckpt"], store, "symbol"), batch_rows=16)
    s = open_store(path)
    assert summary.resumed_from == 0 and classification_of(s).method == "symbol" and PARTIAL not in s.group
    assert (s.read("label") >= 0).all()


def test_head_method_uses_cutouts_remade_from_the_tiles(setup):
    from galaxalign_batch.model.checkpoint import load_checkpoint

    ckpt = _checkpoint(setup["tmp"], "image-only", 3)
    path = setup["tmp"] / "head.zarr"
    pixels, _ = _embed(setup["survey"], ckpt, path)
    store = open_store(path)
    with pytest.raises(ConfigError, match="does not apply"):
        scorer_from_checkpoint(ckpt, store, "combined")
    scorer = scorer_from_checkpoint(ckpt, store, roots=[str(setup["survey"])])
    assert scorer.method == "head"
    classify_store(path, scorer)
    want = load_checkpoint(ckpt).classify(pixels, "head").numpy()
    np.testing.assert_allclose(open_store(path).read("probs"), want, atol=1e-4, rtol=0)


def test_wrong_or_missing_model_is_a_one_line_error(setup, caplog):
    path = _fresh(setup, "d.zarr")
    other = _checkpoint(setup["tmp"], "trimodal", 7)
    with pytest.raises(ModelMismatchError, match="store written by another model"):
        scorer_from_checkpoint(other, open_store(path))
    assert main(["--no-progress", "classify", "--store", str(path), "--model", str(other)]) == 1
    assert main(["--no-progress", "classify", "--store", str(path)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "another model" in errors[0] and "needs --model" in errors[1] and "model-0" not in errors[1]
    assert setup["ckpt"].name in errors[1]  # names the checkpoint the store was embedded with
    assert all("\n" not in e for e in errors)
    s = open_store(path)
    assert classification_of(s) is None and PARTIAL not in s.group


def test_cli_classify(setup, capsys):
    path = _fresh(setup, "e.zarr")
    assert main(["--no-progress", "classify", "--store", str(path), "--model", str(setup["ckpt"])]) == 0
    out = capsys.readouterr().out
    assert "classified" in out and "merging" in out
    assert main(["--no-progress", "classify", "--store", str(path), "--model", str(setup["ckpt"])]) == 0
    assert "already classified" in capsys.readouterr().out
