"""Few-shot heads: learning, calibration, files, determinism, tiny label sets, the CLI and its bad input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from galaxalign_batch.cli import main
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.fewshot import Head, expected_calibration_error, fit_head, load_head
from galaxalign_batch.fewshot.apply import GROUP, PARTIAL, apply_head, fewshot_results
from galaxalign_batch.store import EmbeddingStore, open_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DIM = 32
MODEL = {"kind": "checkpoint", "name": "test", "id": "feedfacefeedface"}


def clusters(n: int, k: int, spread: float, seed: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings around k random directions sharing a common offset (as CLIP embeddings do)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(k, dim))
    common = np.random.default_rng(98).normal(size=dim) * 3
    y = np.arange(n) % k
    rng.shuffle(y)
    x = common + centres[y] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def gaussian_pair(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping classes (Bayes accuracy ~0.84): probabilities must be moderate and honest."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, DIM))
    x[:, 0] += np.where(y == 1, 1.0, -1.0)
    return x.astype(np.float32), y


# ---------------------------------------------------------------------------------------------- heads

@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("k", [2, 4])
def test_heads_learn_separable_embeddings(kind, k):
    X, y = clusters(80, k, 0.6, seed=1)
    Xt, yt = clusters(400, k, 0.6, seed=2)
    head = fit_head(X.astype(np.float16), y, [f"c{i}" for i in range(k)], kind=kind, seed=0)
    P = head.predict_proba(Xt)
    assert P.dtype == np.float32 and P.shape == (400, k)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
    assert np.mean(P.argmax(1) == yt) >= 0.95
    assert np.array_equal(head.predict(Xt), P.argmax(1))
    v = head.validation
    assert v["method"] == "5-fold stratified CV" and v["n"] == 80 and v["accuracy"] >= 0.9 and v["auc"] >= 0.95
    assert head.counts == {f"c{i}": int((y == i).sum()) for i in range(k)}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_calibration_on_overlapping_classes(kind):
    Xt, yt = gaussian_pair(4000, seed=4)
    eces = []
    for seed in (3, 5, 7):  # three labelled sets: temperature scaling on 400 labels varies from set to set
        X, y = gaussian_pair(400, seed=seed)
        head = fit_head(X, y, ["a", "b"], kind=kind, seed=0)
        assert head.validation["calibrated"] and head.temperature != 1.0
        P = head.predict_proba(Xt)
        eces.append(expected_calibration_error(P, yt))
        # the cross-validated estimate is honest (slightly pessimistic: folds train on 80 %; Bayes ~0.84)
        acc = np.mean(P.argmax(1) == yt)
        assert 0.74 < acc < 0.86 and -0.1 < head.validation["accuracy"] - acc < 0.04
    assert np.mean(eces) < 0.05 and max(eces) < 0.08, eces


def test_ece_of_known_cases():
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(np.eye(2)[y], y) == 0.0
    assert expected_calibration_error(np.eye(2)[1 - y], y) == pytest.approx(1.0)
    assert expected_calibration_error(np.full((4, 2), 0.5), y) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_save_load_round_trip(tmp_path, kind):
    X, y = clusters(60, 3, 0.8, seed=5)
    head = fit_head(X, y, ["ring", "not ring", "lens"], kind=kind, seed=1, source={"store": "/x.zarr", "model": MODEL})
    path = head.save(tmp_path / "h.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["h.safetensors"]  # atomic: no temporary left
    back = load_head(path)
    assert isinstance(back, Head)
    Xt, _ = clusters(200, 3, 0.8, seed=6)
    np.testing.assert_array_equal(back.predict_proba(Xt), head.predict_proba(Xt))
    assert back.classes == ["ring", "not ring", "lens"] and back.kind == kind
    assert back.validation == head.validation and back.counts == head.counts
    assert back.source["model"] == MODEL and back.digest == head.digest and back.temperature == head.temperature


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_deterministic_for_a_seed(kind):
    X, y = clusters(60, 3, 1.0, seed=7)
    Xt, _ = clusters(50, 3, 1.0, seed=8)
    a = fit_head(X, y, ["a", "b", "c"], kind=kind, seed=3)
    b = fit_head(X, y, ["a", "b", "c"], kind=kind, seed=3)
    np.testing.assert_array_equal(a.predict_proba(Xt), b.predict_proba(Xt))
    assert a.validation == b.validation and a.digest == b.digest


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("per_class,k", [(1, 2), (2, 2), (2, 3), (3, 3)])
def test_tiny_label_sets(kind, per_class, k):
    X, y = clusters(per_class * k, k, 0.3, seed=9)
    Xt, yt = clusters(300, k, 0.3, seed=10)
    head = fit_head(X, y, [f"c{i}" for i in range(k)], kind=kind)
    P = head.predict_proba(Xt)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
    assert np.mean(P.argmax(1) == yt) >= 0.9  # well-separated clusters: a few labels suffice
    assert head.temperature == 1.0  # too few labels to calibrate
    if per_class < 3:
        assert head.validation is None
    else:
        assert head.validation["folds"] == 3 and not head.validation["calibrated"]


def test_linear_head_is_fast():
    import time

    X, y = clusters(500, 5, 1.0, seed=11, dim=128)
    fit_head(X[:50], y[:50], list("abcde"))  # imports
    t = time.perf_counter()
    fit_head(X, y, list("abcde"))
    assert time.perf_counter() - t < 3.0  # < 1 s on an idle core; margin for a busy shared machine


@pytest.mark.parametrize("args,match", [
    (dict(y=np.zeros(10, int)), "fewer than 1"),                       # the second class has no example
    (dict(classes=["only"]), "at least 2 classes"),
    (dict(classes=["a", "a"]), "unique"),
    (dict(kind="forest"), "kind"),
    (dict(y=np.arange(10) % 3), "0..1"),
    (dict(y=np.ones(10)), "integer"),
    (dict(y=np.zeros(9, int)), r"\(n,\)"),
    (dict(X=np.zeros((10,))), r"\(n, d\)"),
    (dict(X=np.full((10, DIM), np.nan)), "NaN"),
])
def test_fit_head_refuses_bad_input(args, match):
    X, y = clusters(10, 2, 0.5, seed=12)
    kw = dict(X=X, y=y, classes=["a", "b"], kind="linear") | args
    with pytest.raises(ConfigError, match=match):
        fit_head(kw.pop("X"), kw.pop("y"), **kw)


def test_load_head_refuses_other_files(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    for name, match in [("missing", "not found"), ("junk.safetensors", "not a safetensors"),
                        ("plain.safetensors", "not a head file")]:
        with pytest.raises(ConfigError, match=match):
            load_head(tmp_path / name)
    X, y = clusters(10, 2, 0.5, seed=12)
    head = fit_head(X, y, ["a", "b"])
    with pytest.raises(ConfigError, match=r"\(n, 32\)"):
        head.predict_proba(np.zeros((3, 16), np.float32))


# ---------------------------------------------------------------------------------------------- store and CLI

@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """600 rows in 3 tiles: 'ring' objects form one cluster, 'not ring' two others (truth kept in attrs)."""
    X, y = clusters(600, 3, 0.7, seed=13)
    path = tmp_path_factory.mktemp("fewshot") / "s.zarr"
    store = EmbeddingStore.create(path, DIM, attrs={"model": MODEL, "vocabulary": None, "cutout_spec": None},
                                  rows_per_chunk=32)
    for t in range(3):
        sl = slice(200 * t, 200 * (t + 1))
        m = 200
        store.commit([(f"tile{t}", dict(embedding=X[sl], object_id=np.array([f"tile{t}/det{i}" for i in range(m)]),
                                        ra=np.linspace(10, 11, m) + t, dec=np.linspace(-1, 1, m),
                                        tile=np.full(m, f"tile{t}"), x=np.zeros(m, np.float32),
                                        y=np.zeros(m, np.float32), masked_fraction=np.zeros(m, np.float32)), "")])
    store.finalize(truth=[int(v) for v in y])
    return path


def _fresh(store_path, tmp_path, name="s.zarr"):
    dst = tmp_path / name
    shutil.copytree(store_path, dst)
    return dst


def _labels_csv(path, store, rows, extra=True):
    ids = store.read("object_id")
    truth = np.array(store.attrs["truth"])
    lines = ["object_id,label,annotator" if extra else "object_id,label"]
    for r in rows:
        lab = "ring" if truth[r] == 0 else "not ring"
        lines.append(f"{ids[r]},{lab},ann{r % 3}" if extra else f"{ids[r]},{lab}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_cli_fit_and_apply_end_to_end(store_path, tmp_path, capsys, caplog):
    path = _fresh(store_path, tmp_path)
    store = open_store(path)
    labels = _labels_csv(tmp_path / "labels.csv", store, range(0, 600, 15))  # 40 labels from all tiles
    out = tmp_path / "rings.head.safetensors"
    assert main(["--no-progress", "fewshot", "--store", str(path), "--labels", str(labels), "--out", str(out),
                 "--apply", "--batch-rows", "64"]) == 0, _errors(caplog)
    text = capsys.readouterr().out
    assert "linear head on 40 labels, 2 classes" in text and "not ring" in text and "validation (5-fold" in text
    assert "applied to 600 rows" in text
    head = load_head(out)
    assert head.classes == ["not ring", "ring"] and head.source["model"] == MODEL and head.n_labels == 40
    s = open_store(path)
    emb = s.read("embedding").astype(np.float32)
    probs = s.read(f"{GROUP}/rings/probs")
    np.testing.assert_array_equal(probs, head.predict_proba(emb))
    np.testing.assert_array_equal(s.read(f"{GROUP}/rings/label"), probs.argmax(1))
    np.testing.assert_array_equal(s.read(f"{GROUP}/rings/confidence"), probs.max(1))
    truth = np.array(s.attrs["truth"]) == 0
    assert np.mean((probs[:, 1] > 0.5) == truth) > 0.97
    assert "probs" not in s.group and "classification" not in s.attrs  # classify's arrays untouched
    res = fewshot_results(s)
    assert list(res) == ["rings"] and res["rings"]["head"] == head.digest and res["rings"]["rows"] == 600
    assert not os.path.exists(os.path.join(path, PARTIAL))
    # idempotent; an existing head applies under another name
    assert main(["--no-progress", "fewshot", "--store", str(path), "--labels", str(labels), "--out", str(out),
                 "--apply"]) == 0
    assert "already applied" in capsys.readouterr().out
    assert main(["--no-progress", "fewshot", "--store", str(path), "--head", str(out), "--name", "again"]) == 0
    s = open_store(path)
    assert sorted(fewshot_results(s)) == ["again", "rings"]
    np.testing.assert_array_equal(s.read(f"{GROUP}/again/probs"), probs)


def test_mlp_and_classes_option(store_path, tmp_path, capsys):
    path = _fresh(store_path, tmp_path)
    store = open_store(path)
    labels = _labels_csv(tmp_path / "labels.csv", store, range(1, 600, 20), extra=False)
    with open(labels, "a") as f:
        f.write("tile0/det2,not sure\ntile0/det3,artefact\n")
    out = tmp_path / "m.head"
    assert main(["--no-progress", "fewshot", "--store", str(path), "--labels", str(labels), "--out", str(out),
                 "--kind", "mlp", "--classes", "ring,not ring"]) == 0
    text = capsys.readouterr().out
    assert "mlp head on 30 labels" in text and "ignored (not in --classes): 'artefact' 1, 'not sure' 1" in text
    assert load_head(out).classes == ["ring", "not ring"]
    assert "fewshot" not in open_store(path).attrs  # no --apply: the store is not written


def test_apply_resumes_after_a_kill(store_path, tmp_path, monkeypatch):
    path = _fresh(store_path, tmp_path)
    store = open_store(path)
    X = store.read("embedding")[:60]
    head = fit_head(X, np.array(store.attrs["truth"][:60]), ["a", "b", "c"], source={"model": MODEL})
    clean = _fresh(store_path, tmp_path, "clean.zarr")
    apply_head(clean, head, "h", batch_rows=64)
    calls = {"n": 0}
    inner = Head.predict_proba

    def dying(self, x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return inner(self, x)

    monkeypatch.setattr(Head, "predict_proba", dying)
    with pytest.raises(KeyboardInterrupt):
        apply_head(path, head, "h", batch_rows=64)
    monkeypatch.setattr(Head, "predict_proba", inner)
    s = open_store(path)
    assert fewshot_results(s) == {} and s.group[f"{PARTIAL}/h"].attrs["rows_done"] == 192
    summary = apply_head(path, head, "h", batch_rows=64)
    assert summary.resumed_from == 192 and summary.rows == 600
    a, b = open_store(path), open_store(clean)
    for name in ("probs", "label", "confidence"):
        np.testing.assert_array_equal(a.read(f"{GROUP}/h/{name}"), b.read(f"{GROUP}/h/{name}"))
    # another model's head is refused
    other = fit_head(X, np.array(store.attrs["truth"][:60]), ["a", "b", "c"], source={"model": {"id": "0ther"}})
    from galaxalign_batch.store import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="another model"):
        apply_head(path, other, "o")


BAD_LABELS = {
    "unknown ids": ("object_id,label\ntile0/det0,ring\ntile0/det1,not ring\nnope/1,ring\nnope/2,ring\n",
                    "2 of 4 object id(s) are not in the store"),
    "missing column": ("object_id,class\ntile0/det0,ring\n", "no column(s) label"),
    "no header": ("tile0/det0,ring\ntile0/det1,not ring\n", "no column(s) object_id, label"),
    "tab separated": ("object_id\tlabel\ntile0/det0\tring\n", "no column(s) object_id, label"),
    "empty file": ("", "empty label file"),
    "header only": ("object_id,label\n", "no labelled rows"),
    "empty label": ("object_id,label\ntile0/det0,\n", "line 2: empty label"),
    "short row": ("object_id,label\ntile0/det0\n", "line 2 has 1 field"),
    "one class": ("object_id,label\ntile0/det0,ring\ntile0/det1,ring\n", "only one class"),
    "conflict": ("object_id,label\ntile0/det0,ring\ntile0/det1,not ring\ntile0/det0,not ring\n", "labelled both"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_cli_refuses_bad_labels(store_path, tmp_path, caplog, case):
    content, match = BAD_LABELS[case]
    path = _fresh(store_path, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    out = tmp_path / "h.head"
    before = open_store(path).attrs
    assert main(["--no-progress", "fewshot", "--store", str(path), "--labels", str(labels), "--out", str(out),
                 "--apply"]) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and match in errors[0] and "\n" not in errors[0], errors
    assert not out.exists() and open_store(path).attrs == before and GROUP not in open_store(path).group


def test_cli_refuses_bad_stores_and_options(store_path, tmp_path, caplog):
    import zarr

    path = _fresh(store_path, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("object_id,label\ntile0/det0,ring\ntile0/det1,not ring\n")
    binary = tmp_path / "labels.bin"
    binary.write_bytes(b"\x00\x01\x02\xff" * 50)
    (tmp_path / "plain").mkdir()
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    empty = EmbeddingStore.create(tmp_path / "empty.zarr", DIM, attrs={"model": MODEL})
    no_emb = _fresh(store_path, tmp_path, "noemb.zarr")
    shutil.rmtree(no_emb / "embedding")
    out = tmp_path / "h.head"
    cases = [
        (["--store", str(path), "--labels", str(tmp_path / "none.csv"), "--out", str(out)], "label file not found"),
        (["--store", str(path), "--labels", str(binary), "--out", str(out)], "not a"),
        (["--store", str(path), "--labels", str(labels), "--out", str(out), "--classes", "ring,lens"],
         "'lens' have no labelled example"),
        (["--store", str(path), "--labels", str(labels)], "needs --out"),
        (["--store", str(path), "--out", str(out)], "either --labels"),
        (["--store", str(path), "--head", str(out), "--kind", "mlp"], "do not apply"),
        (["--store", str(path), "--labels", str(labels), "--out", str(out), "--name", "bad/name"], "head name"),
        (["--store", str(tmp_path / "plain"), "--labels", str(labels), "--out", str(out)], "cannot open"),
        (["--store", str(tmp_path / "group.zarr"), "--labels", str(labels), "--out", str(out)],
         "not a galaxalign embedding store"),
        (["--store", str(tmp_path / "nowhere.zarr"), "--labels", str(labels), "--out", str(out)], "no such store"),
        (["--store", str(empty.path), "--labels", str(labels), "--out", str(out)], "no rows"),
        (["--store", str(no_emb), "--labels", str(labels), "--out", str(out)], "no embedding"),
    ]
    usage = ("needs --out", "either --labels", "do not apply")  # options that do not go together: exit 2
    for argv, match in cases:
        caplog.clear()
        assert main(["--no-progress", "fewshot"] + argv) == (2 if match in usage else 1), argv
        errors = _errors(caplog)
        assert len(errors) == 1 and match in errors[0], (argv, errors)
        assert not out.exists()
    assert "fewshot" not in open_store(path).attrs
