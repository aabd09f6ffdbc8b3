"""Morphology: statmorph on galsim Sersic profiles of known n and r_half, failure rows, the CLI, regression heads."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

pytest.importorskip("statmorph")
galsim = pytest.importorskip("galsim")

from galaxalign_batch.errors import ConfigError  # noqa: E402
from galaxalign_batch.morphology import MorphologyConfig, measure_stamp, read_table  # noqa: E402
from galaxalign_batch.morphology.measure import cut_stamp, moffat_psf  # noqa: E402

PIX = 0.262
SIGMA = 0.0049  # the simulator's r-band sky noise per pixel (nanomaggy)


def sersic_stamp(n: float, r_half: float, q: float, mag: float, seed: int, size: int = 161, fwhm: float = 1.25):
    flux = 10 ** ((22.5 - mag) / 2.5)
    gal = galsim.Sersic(n=n, half_light_radius=r_half, flux=flux).shear(q=q, beta=0.4 * galsim.radians)
    img = galsim.Convolve(gal, galsim.Moffat(beta=3.0, fwhm=fwhm)).drawImage(nx=size, ny=size, scale=PIX).array
    return img + np.random.default_rng(seed).normal(0.0, SIGMA, img.shape)


@pytest.mark.parametrize("n, r_half, q, c_range", [(1.0, 2.5, 0.6, (2.4, 2.85)), (2.5, 2.0, 0.8, (2.9, 3.4))])
def test_statmorph_recovers_sersic_index_and_half_light_radius(n, r_half, q, c_range):
    img = sersic_stamp(n, r_half, q, mag=17.0, seed=int(n * 10))
    c = (img.shape[0] - 1) / 2
    row = measure_stamp(img, np.full(img.shape, SIGMA), np.zeros(img.shape, bool), c, c, PIX, MorphologyConfig(),
                        moffat_psf(1.25, PIX))
    assert row["error"] == "" and row["flag"] == 0 and row["flag_sersic"] == 0
    assert row["sersic_n"] == pytest.approx(n, rel=0.15)
    # galsim's shear keeps the area: r_half is the circularised radius, statmorph's along the major axis
    assert row["sersic_rhalf_circ"] == pytest.approx(r_half, rel=0.10)
    assert row["sersic_rhalf"] == pytest.approx(r_half / np.sqrt(q), rel=0.10)
    assert row["sersic_ellip"] == pytest.approx(1 - q, abs=0.08)
    # non-parametric: a smooth symmetric profile; concentration 2.7 (n = 1) and 3.5 (n = 2.5) without PSF,
    # lowered by the 1.25" seeing
    assert abs(row["asymmetry"]) < 0.05 and abs(row["smoothness"]) < 0.05
    assert row["rpetro_circ"] > row["rhalf_circ"] > 0
    assert c_range[0] < row["concentration"] < c_range[1]


def test_failures_are_rows_not_exceptions():
    rng = np.random.default_rng(0)
    noise_only = rng.normal(0, SIGMA, (64, 64))
    row = measure_stamp(noise_only * 0.0, np.full((64, 64), SIGMA), np.zeros((64, 64), bool), 32, 32, PIX)
    assert row["flag"] == 4 and "nothing above" in row["error"] and np.isnan(row["gini"])
    img = sersic_stamp(1.0, 1.5, 0.8, 18.0, seed=1, size=101)
    row = measure_stamp(img, np.full(img.shape, SIGMA), np.zeros(img.shape, bool), 5, 5, PIX)  # empty corner
    assert row["flag"] == 4 and "no segment within" in row["error"]


def test_cut_stamp_pads_and_masks_outside_the_tile():
    image = np.arange(100, dtype=float).reshape(10, 10)
    noise = np.ones((10, 10))
    valid = np.ones((10, 10), bool)
    valid[0, 0] = False
    img, sig, mask, x0, y0 = cut_stamp(image, noise, valid, 1.0, 1.0, 5)
    assert (x0, y0) == (-1, -1)
    assert mask[0].all() and mask[:, 0].all() and mask[1, 1]  # padding and the invalid pixel
    assert img[2, 2] == image[1, 1] and not mask[2, 2]
    psf = moffat_psf(1.2, PIX)
    assert psf.shape[0] % 2 == 1 and psf.sum() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_survey(tmp_path_factory):
    from galaxalign_batch.simulate import simulate_survey

    root = tmp_path_factory.mktemp("morphsim") / "sim"
    simulate_survey(root, bricks=1, size=300, seed=5, no_coverage=0.0, stars=0)
    return root


def test_cli_on_tiles(tiny_survey, tmp_path):
    from galaxalign_batch.cli import main

    out = tmp_path / "morph.parquet"
    rc = main(["--no-progress", "morphology", "--tiles", str(tiny_survey), "--out", str(out), "--limit", "3",
               "--workers", "1"])
    assert rc == 0
    t = read_table(out)
    assert len(t) == 3 and len(set(t["object_id"])) == 3
    assert all(i.startswith("9999/") for i in t["object_id"])  # Tractor ids of the simulated catalog
    assert {"concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ", "sersic_n", "sersic_rhalf",
            "flag", "flag_sersic", "error"} <= set(t.colnames)
    assert (np.asarray(t["psf_fwhm"]) > 0.9).all()  # from the catalog's psfsize_r
    assert (np.asarray(t["flag"]) <= 2).all() and np.isfinite(np.asarray(t["gini"])).all()


def test_detected_ids_are_the_stores(tmp_path, cutouts_dir):
    """morphology --tiles names detected sources as embed does ("{tile key}/det{i}", the key a resolved
    path), not after the file stem, so its catalogue joins the store by object_id."""
    import shutil

    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.prepare import prepare_tile
    from galaxalign_batch.morphology.catalog import jobs_from_tiles
    from galaxalign_batch.preprocess import CutoutSpec

    folder = tmp_path / "cubes"
    folder.mkdir()
    shutil.copy(cutouts_dir / "temp_small.fits", folder / "temp_small.fits")
    (job,) = jobs_from_tiles([str(folder)], catalog="detect")
    (ref,) = resolve_tiles([str(folder)])
    embedded = prepare_tile(ref, CutoutSpec(out_size=8), catalog="detect").columns["object_id"]
    assert ref.name != "temp_small" and job.tile == ref.name
    assert len(job.object_id) > 0 and list(job.object_id) == list(embedded)
    assert all(i.startswith(f"{ref.name}/det") for i in job.object_id)


def test_cli_on_a_store_records_missing_tiles(tiny_survey, tmp_path, capsys):
    from galaxalign_batch.cli import main
    from galaxalign_batch.store import EmbeddingStore
    from galaxalign_batch.survey import layout, read_tractor

    brick = layout.list_bricks(tiny_survey)[0]
    src = read_tractor(layout.tractor_path(tiny_survey, brick))[:2]
    path = tmp_path / "s.zarr"
    store = EmbeddingStore.create(path, 8, attrs={"model": {"id": "t", "name": "t", "kind": "test"},
                                                 "vocabulary": None, "cutout_spec": None})
    rows = lambda tile, ids, x, y, ra, dec: dict(  # noqa: E731
        embedding=np.eye(8, dtype=np.float32)[: len(ids)], object_id=np.asarray(ids), ra=np.asarray(ra),
        dec=np.asarray(dec), tile=np.full(len(ids), tile), x=np.asarray(x, np.float32), y=np.asarray(y, np.float32),
        masked_fraction=np.zeros(len(ids), np.float32))
    store.commit([(brick, rows(brick, src["object_id"], src["x"], src["y"], src["ra"], src["dec"]), ""),
                  ("0001p000", rows("0001p000", ["x/0001p000/0"], [5.0], [5.0], [0.1], [0.0]), "")])
    store.finalize()
    out = tmp_path / "m.csv"
    assert main(["--no-progress", "morphology", "--store", str(path), "--survey", str(tiny_survey), "--out", str(out),
                 "--workers", "1"]) == 0
    t = read_table(out)
    assert list(t["object_id"]) == list(src["object_id"]) + ["x/0001p000/0"]
    assert t["flag"][2] == 4 and "brick not found" in t["error"][2]
    assert (np.asarray(t["flag"][:2]) < 4).all()
    assert "1 not measured" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, tiny_survey, caplog):
    from galaxalign_batch.cli import main

    assert main(["morphology", "--tiles", str(tiny_survey), "--out", str(tmp_path / "m.txt")]) == 1
    with pytest.raises(SystemExit) as e:  # neither --store nor --tiles: argparse's usage error
        main(["morphology", "--out", str(tmp_path / "m.csv")])
    assert e.value.code == 2
    assert main(["morphology", "--tiles", str(tiny_survey), "--out", str(tmp_path / "m.csv"), "--limit", "0"]) == 2
    assert main(["morphology", "--store", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "m.csv")]) == 1
    err = caplog.text
    assert "unknown table format" in err and "--limit must be" in err
    assert "no such store" in err
    with pytest.raises(ConfigError, match="no such morphology table"):
        read_table(tmp_path / "nothing.parquet")
    Table({"a": [1]}).write(tmp_path / "x.csv", format="ascii.ecsv")
    with pytest.raises(ConfigError, match="no object_id column"):
        read_table(tmp_path / "x.csv")


def test_regression_heads_score_held_out_rows():
    from galaxalign_batch.morphology import regress

    rng = np.random.default_rng(0)
    n, d = 300, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d)
    table = Table({"gini": 0.5 + 0.05 * (x @ w) / np.sqrt(d) + rng.normal(0, 0.005, n),
                   "sersic_n": 10 ** (0.3 + 0.1 * x[:, 0]),
                   "m20": rng.normal(size=n),  # unrelated to x: no skill
                   "flag": np.zeros(n, np.int16),
                   "flag_sersic": np.r_[np.zeros(n - 10), np.full(10, 2)].astype(np.int16)})
    cv = regress.cross_validate(x, table, ("gini", "sersic_n", "m20"), method="ridge", folds=5)
    s = {r["target"]: r for r in cv.scores}
    assert s["gini"]["r2"] > 0.9 and s["sersic_n"]["r2"] > 0.95 and s["m20"]["r2"] < 0.1
    assert s["sersic_n"]["n"] == n - 10 and s["sersic_n"]["space"] == "log10"  # flag_sersic != 0 left out
    assert np.isnan(cv.predictions["sersic_n"][-10:]).all()
    head = regress.fit_head(x, table, ("gini", "sersic_n"), method="mlp")
    pred = head.predict(x[:5])
    assert pred.colnames == ["gini", "sersic_n"] and (np.asarray(pred["sersic_n"]) > 0).all()
    with pytest.raises(ConfigError, match="no column 'nope'"):
        regress.cross_validate(x, table, ("nope",))
    with pytest.raises(ConfigError, match="embeddings must be"):
        regress.cross_validate(x[:10], table, ("gini",))
    with pytest.raises(ConfigError, match="unknown regression method"):
        regress.make_model("forest")
