"""`galaxalign-batch cutout`: pictures of the sky from tiles, north up, in the chosen stretch."""

from __future__ import annotations

import shutil

import numpy as np
from astropy.io import fits
from PIL import Image

from galaxalign_batch.cli import main


def _centre(path):
    h = fits.getheader(path)
    return h["CRVAL1"], h["CRVAL2"]


def test_cutout_of_a_galaxy_is_its_galaxy_zoo_picture(cutouts_dir, tmp_path, capsys):
    """Both cubes hold the galaxy: the finer one is used, and at its own scale the gz-decals picture
    is the Galaxy Zoo subject image (measured: at most 1 grey level apart)."""
    ra, dec = _centre(cutouts_dir / "example_a.fits")
    out = tmp_path / "pics" / "a.png"
    rc = main(["cutout", "--tiles", str(cutouts_dir / "temp_small.fits"), str(cutouts_dir / "example_a.fits"),
               "--ra", str(ra), "--dec", str(dec), "--angular-size", "42.4", "--pixels", "424", "--stretch", "gz-decals",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tile example_a" in printed and "gz-decals north-up" in printed
    got = np.asarray(Image.open(out)).astype(np.int16)
    subject = np.asarray(Image.open(cutouts_dir / "subjects" / "example_a.png"))[..., :3].astype(np.int16)
    assert got.shape == (424, 424, 3) and np.abs(got - subject).max() <= 2


def test_targets_file_writes_one_picture_per_target_and_reports_misses(cutouts_dir, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in ("example_a.fits", "example_b.fits"):
        shutil.copy(cutouts_dir / name, tiles / name)
    (ra_a, dec_a), (ra_b, dec_b) = _centre(tiles / "example_a.fits"), _centre(tiles / "example_b.fits")
    targets = tmp_path / "targets.csv"
    targets.write_text(f"name,ra,dec\ngalaxy a,{ra_a},{dec_a}\nb,{ra_b},{dec_b}\nnowhere,10.0,10.0\n")
    out = tmp_path / "pics"
    rc = main(["cutout", "--tiles", str(tiles), "--targets", str(targets), "--pixels", "64", "--out", str(out)])
    assert rc == 3  # one target is on no tile
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "galaxy_a.png"]
    a = np.asarray(Image.open(out / "galaxy_a.png"))
    b = np.asarray(Image.open(out / "b.png"))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)
    # north-up and fits orientations of the same target are vertical mirrors (Legacy Survey WCS)
    flipped = tmp_path / "fits.png"
    assert main(["cutout", "--tiles", str(tiles), "--ra", str(ra_a), "--dec", str(dec_a), "--pixels", "64",
                 "--orientation", "fits", "--out", str(flipped)]) == 0
    assert np.array_equal(np.asarray(Image.open(flipped))[::-1], a)


def test_cutout_argument_errors(cutouts_dir, tmp_path):
    tile = str(cutouts_dir / "example_a.fits")
    assert main(["cutout", "--tiles", tile, "--ra", "1", "--dec", "2", "--out", str(tmp_path / "x.jpg")]) == 1
    assert main(["cutout", "--tiles", tile, "--ra", "1", "--out", str(tmp_path / "x.png")]) == 2  # usage: no --dec
    assert main(["cutout", "--tiles", tile, "--ra", "1", "--dec", "2", "--out", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()
