"""The simulated Legacy Survey (galaxalign_batch.simulate): galaxies, brick files, catalogues, labelled set."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import lease_holder
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.simulate import Conditions, class_keys, draw_galaxy, draw_star, simulate_labelled, simulate_survey
from galaxalign_batch.simulate.survey import MASKBITS
from galaxalign_batch.survey import layout
from galaxalign_batch.vocabulary import load_vocabulary

fitsio = pytest.importorskip("fitsio")
from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

SMALL = dict(bricks=2, size=256, seed=7, density=12000, stars=2000, no_coverage=1.0)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "dr9"
    summary = simulate_survey(out, **SMALL)
    return out, summary


def _cat(root, name):
    return fitsio.read(str(layout.tractor_path(root, name)), ext=1)


def _str(a) -> np.ndarray:
    """FITS string columns as a str array (fitsio returns unicode or bytes depending on version)."""
    a = np.asarray(a)
    return np.char.decode(a) if a.dtype.kind == "S" else a.astype(str)


# --- galaxies -------------------------------------------------------------------------------------

def _moment_axis_ratio(img: np.ndarray) -> float:
    y, x = np.mgrid[:img.shape[0], :img.shape[1]]
    w = np.clip(img, 0, None)
    w = w * (w > 0.02 * w.max())
    m = w.sum()
    cx, cy = (w * x).sum() / m, (w * y).sum() / m
    cxx, cyy, cxy = (w * (x - cx) ** 2).sum() / m, (w * (y - cy) ** 2).sum() / m, (w * (x - cx) * (y - cy)).sum() / m
    ev = np.linalg.eigvalsh([[cxx, cxy], [cxy, cyy]])
    return float(np.sqrt(ev[0] / ev[1]))


def test_draw_galaxy_every_class_flux_and_truth():
    keys = class_keys()
    assert keys == load_vocabulary("galaxy10").keys and len(keys) == 10
    for i, key in enumerate(keys):
        img, truth = draw_galaxy(key, np.random.default_rng(i), stamp_size=128, mag_r=17.0)
        assert img.shape == (3, 128, 128) and img.dtype == np.float32 and np.isfinite(img).all()
        assert truth["class_key"] == key and truth["class_index"] == i
        assert truth["mag_r"] == 17.0 and truth["flux_r"] == pytest.approx(10 ** ((22.5 - 17.0) / 2.5), rel=1e-6)
        # most of the light is in the stamp (wings beyond it are tapered away)
        assert 0.75 * truth["flux_r"] < img[1].sum() < 1.01 * truth["flux_r"], key
        assert 1.0 < truth["r_half"] < 10.0 and truth["type"] in ("DEV", "SER", "EXP")


def test_class_structure_differs():
    rng = np.random.default_rng(3)
    q = {k: np.median([_moment_axis_ratio(draw_galaxy(k, rng, stamp_size=128, mag_r=16.5)[0][1]) for _ in range(6)])
         for k in ("round_smooth", "in_between_round_smooth", "cigar_smooth", "edge_on_no_bulge")}
    assert q["round_smooth"] > 0.8 > q["in_between_round_smooth"] > q["cigar_smooth"] > q["edge_on_no_bulge"]
    assert q["cigar_smooth"] < 0.5
    tight = [draw_galaxy("unbarred_tight_spiral", rng)[1]["params"]["pitch_deg"] for _ in range(10)]
    loose = [draw_galaxy("unbarred_loose_spiral", rng)[1]["params"]["pitch_deg"] for _ in range(10)]
    assert max(tight) < 15 < 25 < min(loose)
    barred = draw_galaxy("barred_spiral", rng)[1]["params"]
    assert barred["bar_frac"] > 0.1 and barred["r_start"] == barred["bar_length"]  # arms start at the bar ends
    # colours: smooth (old) galaxies are redder in g-r than loose spirals
    def gr(k):
        t = draw_galaxy(k, rng, stamp_size=64)[1]
        return t["mag_g"] - t["mag_r"]
    red = np.median([gr("round_smooth") for _ in range(5)])
    assert red > np.median([gr("unbarred_loose_spiral") for _ in range(5)]) + 0.2


def test_draw_is_deterministic_and_offsets_move_the_light():
    a, ta = draw_galaxy("merging", np.random.default_rng(5), stamp_size=96)
    b, tb = draw_galaxy("merging", np.random.default_rng(5), stamp_size=96)
    assert np.array_equal(a, b) and ta == tb
    s0, _ = draw_star(np.random.default_rng(1), stamp_size=32, mag_r=18)
    s1, _ = draw_star(np.random.default_rng(1), stamp_size=32, mag_r=18, offset=(1.0, 0.0))
    yc, xc = np.unravel_index(np.argmax(s0[1]), s0[1].shape), np.unravel_index(np.argmax(s1[1]), s1[1].shape)
    assert xc[1] in (yc[1] + 1, yc[1] + 2) and xc[0] == yc[0]   # +x offset moves the star one column right
    with pytest.raises(ConfigError):
        draw_galaxy("spiral", np.random.default_rng(0))
    with pytest.raises(ConfigError):
        draw_galaxy("round_smooth", np.random.default_rng(0), bands=("g", "u"))


# --- brick files ----------------------------------------------------------------------------------

def test_layout_and_survey_bricks(survey):
    root, summary = survey
    names = summary["bricks"]
    assert layout.list_bricks(root) == names and len(names) == 2 and layout.is_survey_root(root)
    for n in names:
        b = layout.brick_by_name(n)    # real-grid bricks near RA 150, Dec 2.2
        assert abs(b.ra - 150.1) < 1 and abs(b.dec - 2.2) < 0.5
        for band in "grz":
            assert layout.image_path(root, n, band).exists() and layout.image_path(root, n, band, "invvar").exists()
        assert layout.maskbits_path(root, n).exists() and layout.tractor_path(root, n).exists()
    sb = fitsio.read(str(layout.survey_bricks_path(root)))
    assert sorted(_str(sb["brickname"])) == names
    b0 = layout.brick_by_name(names[0])
    row = sb[list(_str(sb["brickname"])).index(names[0])]
    assert (row["brickid"], row["ra1"], row["dec2"]) == (b0.brickid, b0.ra1, b0.dec2)
    json.loads((Path(root) / "simulation.json").read_text())


def test_image_headers_and_compression(survey):
    root, summary = survey
    name = summary["bricks"][0]
    b = layout.brick_by_name(name)
    path = layout.image_path(root, name, "r")
    with fits.open(path) as hdul:
        hdu = hdul[1]
        assert isinstance(hdu, fits.CompImageHDU)
        h = hdu.header
        ch = hdu._bintable.header if hasattr(hdu, "_bintable") else hdul[1]._header
        data_astropy = hdu.data.astype(np.float32)
    raw = fitsio.read_header(str(path), ext=1)
    assert raw["ZCMPTYPE"] == "RICE_1" and raw["ZQUANTIZ"] == "SUBTRACTIVE_DITHER_2"
    assert (raw["ZTILE1"], raw["ZTILE2"]) == (100, 100)
    del ch
    assert h["CTYPE1"] == "RA---TAN" and h["CTYPE2"] == "DEC--TAN"
    assert (h["CRVAL1"], h["CRVAL2"]) == (b.ra, b.dec) and (h["CRPIX1"], h["CRPIX2"]) == (128.5, 128.5)
    assert h["CD1_1"] == pytest.approx(-0.262 / 3600) and h["CD2_2"] == pytest.approx(0.262 / 3600)
    assert h["CD1_2"] == 0 and h["CD2_1"] == 0
    assert h["BRICKNAM"] == name and h["BRICK"] == name and h["BRICKID"] == b.brickid
    assert (h["RAMIN"], h["RAMAX"], h["DECMIN"], h["DECMAX"]) == (b.ra1, b.ra2, b.dec1, b.dec2)
    assert (h["CENTRA"], h["CENTDEC"]) == (b.ra, b.dec)
    assert h["BANDS"] == "grz" and h["BAND"] == "r" and h["MAGZERO"] == 22.5 and h["BUNIT"] == "nanomaggy"
    assert h["RELEASE"] and h["SURVEY"]
    data_fitsio = fitsio.read(str(path), ext=1)
    assert data_fitsio.shape == (256, 256) and data_fitsio.dtype.kind == "f"
    assert np.array_equal(data_fitsio, data_astropy)
    iv = fitsio.read_header(str(layout.image_path(root, name, "r", "invvar")), ext=1)
    assert iv["BUNIT"] == "1/nanomaggy^2" and iv["ZCMPTYPE"] == "RICE_1"
    mb, mh = fitsio.read(str(layout.maskbits_path(root, name)), ext=1, header=True)
    assert mb.dtype == np.int16 and mh["ZCMPTYPE"] == "HCOMPRESS_1"


def test_tractor_columns_and_truth(survey):
    root, summary = survey
    keys = class_keys()
    all_classes = set()
    for name in summary["bricks"]:
        cat = _cat(root, name)
        dt = cat.dtype
        for col, kind in [("release", "i"), ("brickid", "i"), ("brickname", "S"), ("objid", "i"), ("ra", "f"),
                          ("dec", "f"), ("bx", "f"), ("by", "f"), ("type", "S"), ("brick_primary", "b"),
                          ("maskbits", "i"), ("shape_r", "f"), ("shape_e1", "f"), ("shape_e2", "f"),
                          ("sersic", "f"), ("true_class", "i"), ("true_class_key", "S")] + \
                [(f"{c}_{b}", "f") for c in ("flux", "flux_ivar") for b in "grz"]:
            assert dt[col].kind == kind or (kind == "S" and dt[col].kind == "U"), col
        assert dt["ra"].itemsize == 8 and dt["dec"].itemsize == 8
        assert np.array_equal(cat["objid"], np.arange(len(cat)))
        assert set(_str(cat["brickname"])) == {name}
        assert set(_str(cat["type"])) <= {"PSF", "REX", "EXP", "DEV", "SER"}
        gal = cat["true_class"] >= 0
        assert np.all(_str(cat["true_class_key"][gal]) == np.array(keys)[cat["true_class"][gal]])
        assert np.all(_str(cat["true_class_key"][~gal]) == "star")
        assert np.all(_str(cat["type"][~gal]) == "PSF")
        assert np.all((cat["bx"] >= -0.5) & (cat["bx"] < 255.5) & (cat["by"] >= -0.5) & (cat["by"] < 255.5))
        assert np.all(cat["brick_primary"])   # 256-px images lie inside the brick's unique area
        all_classes |= set(cat["true_class"][gal].tolist())
        assert 40 < gal.sum() < 100 and (~gal).sum() > 0
    assert all_classes == set(range(10))


def test_catalogue_positions_round_trip_through_the_wcs(survey):
    root, summary = survey
    for name in summary["bricks"]:
        cat = _cat(root, name)
        w = WCS(fitsio.read_header(str(layout.image_path(root, name, "g")), ext=1))
        ra, dec = w.all_pix2world(cat["bx"].astype(np.float64), cat["by"].astype(np.float64), 0)
        sep = np.hypot((ra - cat["ra"]) * np.cos(np.radians(cat["dec"])), dec - cat["dec"]) * 3600
        assert sep.max() < 0.01


def test_sources_are_where_the_catalogue_says(survey):
    root, summary = survey
    name = summary["bricks"][1]
    cat = _cat(root, name)
    img = fitsio.read(str(layout.image_path(root, name, "r")))
    iv = fitsio.read(str(layout.image_path(root, name, "r", "invvar")))
    bright = cat[(cat["true_mag_r"] < 18.0) & (cat["flux_ivar_r"] > 0)]
    assert len(bright) > 5
    for s in bright:
        x, y = int(round(float(s["bx"]))), int(round(float(s["by"])))
        box = img[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3]
        noise = 1 / np.sqrt(np.median(iv[iv > 0]))
        assert box.mean() > 5 * noise, s["objid"]


def test_noise_matches_invvar(tmp_path):
    simulate_survey(tmp_path, bricks=1, size=128, seed=3, density=0, stars=0, no_coverage=1.0)
    name = layout.list_bricks(tmp_path)[0]
    for band in "grz":
        img = fitsio.read(str(layout.image_path(tmp_path, name, band)))
        iv = fitsio.read(str(layout.image_path(tmp_path, name, band, "invvar")))
        covered = iv > 0
        assert 0.95 < np.std(img[covered] * np.sqrt(iv[covered])) < 1.05
        assert np.all(img[~covered] == 0.0)


def test_holes_are_masked_and_flagged(survey):
    root, summary = survey
    n_holes = 0
    for name in summary["bricks"]:
        mb = fitsio.read(str(layout.maskbits_path(root, name)))
        cat = _cat(root, name)
        px = np.clip(np.round(cat["bx"]).astype(int), 0, 255)
        py = np.clip(np.round(cat["by"]).astype(int), 0, 255)
        assert np.array_equal(cat["maskbits"], mb[py, px])
        any_cover = np.zeros((256, 256), dtype=bool)
        for band in "grz":
            img = fitsio.read(str(layout.image_path(root, name, band)))
            iv = fitsio.read(str(layout.image_path(root, name, band, "invvar")))
            covered = iv > 0
            any_cover |= covered
            assert np.all(img[~covered] == 0.0) and np.all(img[covered] != 0.0)
            allmask = (mb & (1 << MASKBITS[f"ALLMASK_{band.upper()}"])) != 0
            assert np.array_equal(allmask, ~covered)
            n_holes += int((~covered).sum() > 100)
            assert np.all(cat[f"nobs_{band}"][~covered[py, px]] == 0)
            assert np.all(cat[f"nobs_{band}"][covered[py, px]] > 0)
        assert np.all(any_cover[py, px])   # sources without any coverage are not catalogued
    assert n_holes >= 1   # no_coverage=1.0: every brick has a region without coverage in some band


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path):
    kw = dict(bricks=2, size=64, density=10000, stars=3000, no_coverage=1.0)
    simulate_survey(tmp_path / "a", seed=11, **kw)
    simulate_survey(tmp_path / "b", seed=11, workers=2, **kw)
    simulate_survey(tmp_path / "c", seed=12, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.fits*"))
    assert len(files) == 2 * 8 + 1
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    img = layout.image_path("", layout.list_bricks(tmp_path / "a")[0], "r")
    assert not np.array_equal(fitsio.read(str(tmp_path / "a" / img)), fitsio.read(str(tmp_path / "c" / img)))


def test_bad_arguments_and_foreign_directories(tmp_path):
    with pytest.raises(ConfigError, match="size"):
        simulate_survey(tmp_path / "x", size=0)
    with pytest.raises(ConfigError, match="size"):
        simulate_survey(tmp_path / "x", size=4000)
    with pytest.raises(ConfigError, match="bricks"):
        simulate_survey(tmp_path / "x", bricks=0)
    with pytest.raises(ConfigError):
        simulate_survey(tmp_path / "x", bricks=["1497p025"])   # not a real brick name
    simulate_survey(tmp_path / "s", bricks=1, size=48, density=100, stars=0)
    with pytest.raises(ConfigError, match="seed"):
        simulate_survey(tmp_path / "s", bricks=1, size=48, density=100, stars=0, seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a simulation"):
        simulate_survey(tmp_path / "other", bricks=1, size=48)


def test_full_size_bricks_overlap_with_one_primary(tmp_path):
    # one band keeps this quick: writing 3600^2 fpacked images dominates the cost
    summary = simulate_survey(tmp_path, bricks=2, size=3600, seed=2, density=40, stars=6, no_coverage=0.0,
                              bands=("r",), workers=2)
    names = summary["bricks"]
    b = [layout.brick_by_name(n) for n in names]
    assert b[0].dec == b[1].dec and b[0].ra2 == b[1].ra1   # neighbours in one row
    cats = [_cat(tmp_path, n) for n in names]
    ids = np.concatenate([c["sim_id"] for c in cats])
    primary = np.concatenate([c["brick_primary"] for c in cats])
    home = ids // 1_000_000
    ours = np.isin(home, [x.brickid for x in b])
    shared = [i for i in np.unique(ids) if (ids == i).sum() == 2]
    assert len(shared) >= 1                      # sources in the overlap appear in both catalogues
    for i in np.unique(ids[ours]):
        assert primary[ids == i].sum() == 1      # ... and are primary in exactly one
    assert not primary[~ours].any()              # sources homed in other bricks are never primary here
    for i in shared:
        r0, r1 = cats[0][cats[0]["sim_id"] == i][0], cats[1][cats[1]["sim_id"] == i][0]
        assert (r0["ra"], r0["dec"], r0["true_class"], r0["true_mag_r"]) == (r1["ra"], r1["dec"], r1["true_class"],
                                                                             r1["true_mag_r"])
    mb = fitsio.read(str(layout.maskbits_path(tmp_path, names[0])))
    nprim = (mb & 1) != 0
    assert 0.05 < nprim.mean() < 0.15 and not nprim[1700:1900, 1700:1900].any()


# --- labelled set ---------------------------------------------------------------------------------

def test_labelled_set_is_stratified_and_disjoint(tmp_path):
    m = simulate_labelled(tmp_path, n_per_class=6, stamp_size=48, seed=4)
    keys = class_keys()
    assert m["vocabulary"]["keys"] == keys and m["bands"] == ["g", "r", "z"] and m["pixscale"] == 0.262
    seen = set()
    for split, n in (("train", 4), ("val", 1), ("test", 1)):
        d = np.load(tmp_path / "labelled" / f"{split}.npz")
        assert d["flux"].shape == (10 * n, 3, 48, 48) and d["flux"].dtype == np.float32
        assert d["label"].dtype == np.int64
        assert np.array_equal(np.bincount(d["label"], minlength=10), np.full(10, n))
        assert m["counts"][split] == {k: n for k in keys}
        for col in ("sersic_n", "r_half", "mag_r"):
            assert d[col].shape == (10 * n,) and np.isfinite(d[col]).all()
        assert np.all((d["mag_r"] >= 15.5) & (d["mag_r"] <= 19.0))
        pairs = set(zip(d["label"].tolist(), d["index"].tolist()))
        assert len(pairs) == 10 * n and not pairs & seen
        seen |= pairs
        # sky noise at survey depth: pixel-to-pixel differences in the corners are noise
        corner = d["flux"][:, 1, :8, :8]
        sigma = np.median(np.abs(np.diff(corner, axis=-1))) * 1.4826 / np.sqrt(2)
        assert 0.003 < sigma < 0.008
    assert seen == {(c, i) for c in range(10) for i in range(6)}
    manifest = json.loads((tmp_path / "labelled" / "manifest.json").read_text())
    assert manifest["seed"] == 4 and manifest["stamp_size"] == 48 and manifest["generator_version"]
    again = simulate_labelled(tmp_path / "again", n_per_class=6, stamp_size=48, seed=4, workers=2)
    assert again["counts"] == m["counts"]
    assert np.array_equal(np.load(tmp_path / "labelled" / "val.npz")["flux"],
                          np.load(tmp_path / "again" / "labelled" / "val.npz")["flux"])
    with pytest.raises(ConfigError):
        simulate_labelled(tmp_path, n_per_class=6, stamp_size=48, seed=5)
    with pytest.raises(ConfigError):
        simulate_labelled(tmp_path / "bad", splits=(0.5, 0.5, 0.5))


def test_conditions_depth_gives_the_noise():
    c = Conditions.nominal()
    sig = c.sigmas()
    # a 5-sigma point source at the depth: optimal flux error = sigma_pix / psfnorm = F5 / 5
    f5 = 10 ** ((22.5 - np.array([c.depth[b] for b in c.bands])) / 2.5)
    assert np.allclose(sig / c.psfnorms(), f5 / 5)
    assert np.all((sig > 0.002) & (sig < 0.02))


def test_cli_simulate(tmp_path, capsys):
    from galaxalign_batch.cli import main

    assert main(["simulate", "--out", str(tmp_path / "o"), "--bricks", "1", "--size", "64", "--density", "8000",
                 "--labelled", "--n-per-class", "3", "--stamp-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 brick(s) of 64x64 px" in out and "labelled set" in out
    assert layout.is_survey_root(tmp_path / "o") and (tmp_path / "o" / "labelled" / "train.npz").exists()
    assert main(["simulate", "--out", str(tmp_path / "o2"), "--size", "0"]) == 1
    with pytest.raises(SystemExit) as e:  # --out is required: argparse's usage error
        main(["simulate"])
    assert e.value.code == 2


def test_demo_refuses_a_sky_of_another_generator_version(tmp_path):
    """A demo folder made by an older simulator (and its model) must not be reused silently."""
    from galaxalign_batch.cli import main
    from galaxalign_batch.simulate import GENERATOR_VERSION

    (tmp_path / "sky" / "labelled").mkdir(parents=True)
    (tmp_path / "sky" / "labelled" / "manifest.json").write_text('{"generator_version": "0"}')
    assert GENERATOR_VERSION != "0"
    assert main(["demo", "--out", str(tmp_path), "--size", "smallest"]) != 0
    assert not (tmp_path / "foundation").exists() and not (tmp_path / "model").exists()


# --- one run per survey root; a killed run is finished by the same command --------------------------

def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_simulation_into_the_same_folder_is_refused(tmp_path, caplog):
    """Before the lease, two runs into one folder both exited 0 and left bricks of one seed under the
    other's manifest."""
    from galaxalign_batch.cli import main
    from galaxalign_batch.lease import LockError

    out = tmp_path / "sky"
    args = ["simulate", "--out", str(out), "--bricks", "1", "--size", "48", "--density", "100", "--labelled",
            "--n-per-class", "2", "--stamp-size", "32"]
    with lease_holder(out) as other:
        assert main(args) == 1
        err = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(err) == 1 and "\n" not in err[0]
        assert "is being written by another run" in err[0] and f"pid {other.pid}" in err[0]
        with pytest.raises(LockError):
            simulate_labelled(out, n_per_class=2, stamp_size=32)
        assert not out.exists()
    assert main(args) == 0  # the holder is gone
    assert not Path(str(out) + ".lock").exists()


@pytest.mark.slow
def test_a_killed_simulation_is_finished_by_the_same_command(tmp_path):
    """SIGKILL after the first brick: the re-run of the same command (refused before: 'not a simulation
    made by galaxalign-batch') completes, byte for byte the survey a clean run writes, with no temporary
    file left."""
    from galaxalign_batch import atomic
    from galaxalign_batch.cli import main

    out = tmp_path / "sky"
    args = ["simulate", "--out", str(out), "--bricks", "3", "--size", "1024", "--seed", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "galaxalign_batch", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while not list((out / "tractor").rglob("tractor-*.fits")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    manifest = json.loads((out / "simulation.json").read_text())
    assert manifest["complete"] is False, "the run finished before the kill: nothing was tested"
    assert main(args) == 0
    assert json.loads((out / "simulation.json").read_text())["complete"] is True
    simulate_survey(tmp_path / "clean", bricks=3, size=1024, seed=5)
    assert _tree(out) == _tree(tmp_path / "clean")
    assert not [p for p in out.rglob("*") if atomic.is_partial(p.name)] and not Path(str(out) + ".lock").exists()


def test_a_labelled_set_cut_short_has_no_manifest_and_train_says_so(tmp_path, monkeypatch):
    from galaxalign_batch.model.data import source_kind
    from galaxalign_batch.simulate import labelled as lab

    out = tmp_path / "sky"
    kw = dict(n_per_class=2, stamp_size=32)
    simulate_labelled(out, seed=1, **kw)
    assert source_kind(out) == "simulated"
    real, calls = np.savez, []

    def savez_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the first split and the second
        return real(*a, **k)

    monkeypatch.setattr(lab.np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        simulate_labelled(out, seed=2, overwrite=True, **kw)
    monkeypatch.setattr(lab.np, "savez", real)
    assert not (out / "labelled" / "manifest.json").exists()  # train.npz is seed 2's: the old manifest is gone
    with pytest.raises(ConfigError, match="without its manifest.json"):
        source_kind(out)
    simulate_labelled(out, seed=2, overwrite=True, **kw)
    assert json.loads((out / "labelled" / "manifest.json").read_text())["seed"] == 2
