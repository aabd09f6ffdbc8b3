"""`morphology --regress`: regression heads fitted on a table, written as store columns morphology/<target>."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from galaxalign_batch.cli import main
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.morphology.apply import ATTR, regress_store, regression_columns
from galaxalign_batch.store import EmbeddingStore, open_store

N, D = 600, 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def setup(tmp_path):
    """A store whose embeddings encode three parameters linearly, and a measured table of 240 of its sources
    (with statmorph's flags: 20 flagged bad, 15 with a failed Sersic fit)."""
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(N, D)))
    a, b, c = (rng.normal(size=D) for _ in range(3))
    truth = {"sersic_n": 10 ** (0.4 + 2.0 * emb @ a / np.linalg.norm(a)),
             "sersic_rhalf_circ": 10 ** (0.3 + 1.5 * emb @ b / np.linalg.norm(b)),
             "axis_ratio": np.clip(0.6 + 1.2 * emb @ c / np.linalg.norm(c), 0.05, 1.0)}
    path = tmp_path / "s.zarr"
    store = EmbeddingStore.create(path, D, attrs={"model": {"id": "m", "name": "m", "kind": "test"},
                                                 "vocabulary": None, "cutout_spec": None}, rows_per_chunk=128)
    ids = np.array([f"10000/b/{i}" for i in range(N)])
    store.commit([("b", dict(embedding=emb, object_id=ids, ra=rng.uniform(150, 151, N), dec=rng.uniform(2, 3, N),
                             tile=np.full(N, "b"), x=np.zeros(N, np.float32), y=np.zeros(N, np.float32),
                             masked_fraction=np.zeros(N, np.float32)), "")])
    store.finalize()
    measured = rng.choice(N, 240, replace=False)
    noise = rng.normal(0, 0.02, (3, 240))
    t = Table({"object_id": ids[measured],
               "sersic_n": truth["sersic_n"][measured] * 10 ** noise[0],
               "sersic_rhalf_circ": truth["sersic_rhalf_circ"][measured] * 10 ** noise[1],
               "sersic_ellip": 1 - truth["axis_ratio"][measured] + noise[2],
               "flag": np.zeros(240, np.int64), "flag_sersic": np.zeros(240, np.int64)})
    t["flag"][:20] = 2
    t["sersic_n"][:20] = 99.0  # what a bad measurement looks like: must not train the heads
    t["flag_sersic"][20:35] = 1
    t["sersic_n"][20:35] = 0.05
    t.write(tmp_path / "morph.parquet")
    return {"path": path, "table": tmp_path / "morph.parquet", "truth": truth, "measured": measured}


def test_regress_writes_store_columns_that_predict_unmeasured_rows(setup, capsys):
    assert main(["--no-progress", "morphology", "--store", str(setup["path"]), "--regress", str(setup["table"]),
                 "--batch-rows", "128"]) == 0
    out = capsys.readouterr().out
    assert "5-fold cross-validated" in out and "wrote morphology/sersic_n, morphology/sersic_rhalf_circ, " \
                                                "morphology/axis_ratio for 600 rows" in out
    store = open_store(setup["path"])
    cols = regression_columns(store)
    assert set(cols) == {"sersic_n", "sersic_rhalf_circ", "axis_ratio"}
    meta = store.attrs[ATTR]
    assert meta["rows"] == N and meta["rows_used"] == {"sersic_n": 205, "sersic_rhalf_circ": 205, "axis_ratio": 205}
    assert meta["cv"]["sersic_n"]["r2"] > 0.9 and meta["cv"]["axis_ratio"]["space"] == "linear"
    unmeasured = np.setdiff1d(np.arange(N), setup["measured"])
    for t, v in cols.items():
        assert v.dtype == np.float32 and v.shape == (N,) and np.isfinite(v).all()
        true = setup["truth"][t][unmeasured]
        pred = v[unmeasured].astype(np.float64)
        if t != "axis_ratio":
            true, pred = np.log10(true), np.log10(pred)
        assert np.corrcoef(true, pred)[0, 1] > 0.95, t  # rows the heads never saw
    # the work area is gone; a re-run does nothing; another target set replaces the group
    assert "_morphology_partial" not in store
    assert main(["--no-progress", "morphology", "--store", str(setup["path"]), "--regress", str(setup["table"])]) == 0
    assert "up to date" in capsys.readouterr().out
    s = regress_store(setup["path"], setup["table"], targets=["sersic_n"], method="mlp")
    assert s.targets == ["sersic_n"] and not s.up_to_date
    store = open_store(setup["path"])
    assert set(regression_columns(store)) == {"sersic_n"} and "morphology/axis_ratio" not in store


def test_regress_refusals(setup, tmp_path, caplog):
    with pytest.raises(ConfigError, match="no column"):
        regress_store(setup["path"], setup["table"], targets=["gini"])
    other = Table({"object_id": [f"x/{i}" for i in range(30)], "sersic_n": np.ones(30)})
    other.write(tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="none of its 30 object ids is in the store"):
        regress_store(setup["path"], tmp_path / "other.parquet", targets=["sersic_n"])
    few = Table({"object_id": [f"10000/b/{i}" for i in range(10)], "sersic_n": np.ones(10)})
    few.write(tmp_path / "few.parquet")
    assert main(["--no-progress", "morphology", "--store", str(setup["path"]), "--regress",
                 str(tmp_path / "few.parquet"), "--targets", "sersic_n"]) == 1
    assert any("only 10 usable rows" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert ATTR not in open_store(setup["path"]).attrs  # nothing written
