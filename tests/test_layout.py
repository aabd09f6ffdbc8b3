"""The Legacy Survey brick grid and file layout (galaxalign_batch.survey.layout)."""

from __future__ import annotations

import numpy as np
import pytest

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.survey import layout as L


def test_grid_has_the_dr9_brick_count():
    _, ncols, first_id = L._grid()
    assert len(ncols) == 721
    assert int(ncols.sum()) == 662174  # rows in DR9 survey-bricks.fits
    assert first_id[0] == 1 and ncols[0] == ncols[-1] == 1
    assert np.all(ncols[1:-1] % 2 == 0)


@pytest.mark.parametrize("ra,dec,name", [
    (149.8, 2.5, "1498p025"),     # centre 149.875, +2.5
    (149.7, 2.5, "1496p025"),     # centre 149.625
    (0.1, -0.25, "0001m002"),
    (0.1, 0.0, "0001p000"),
    (359.99, 0.05, "3598p000"),
    (150.0, 2.0, "1501p020"),
    (123.0, 89.99, "1800p900"),   # polar caps are one brick
    (5.0, -90.0, "1800m900"),
])
def test_known_names(ra, dec, name):
    assert L.brick_name(ra, dec) == name


def test_brick_at_fields_and_unique_area():
    b = L.brick_at(149.8, 2.5)
    assert (b.brickname, b.brickrow, b.brickcol) == ("1498p025", 370, 599)
    assert (b.ra, b.dec) == (149.875, 2.5)
    assert (b.ra1, b.ra2, b.dec1, b.dec2) == (149.75, 150.0, 2.375, 2.625)
    assert b.contains(149.75, 2.375) and not b.contains(150.0, 2.5) and not b.contains(149.8, 2.625)
    # brickid counts bricks row by row from the south pole, 1-based
    assert L.brick_at(0.0, -90.0).brickid == 1
    assert L.brick_at(0.0, -89.8).brickid == 2
    assert L.brick_at(0.0, 90.0).brickid == 662174


def test_name_round_trip_over_the_sky():
    rng = np.random.default_rng(1)
    ra = rng.uniform(0, 360, 400)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 400)))
    names = L.brick_name(ra, dec)
    assert names.shape == (400,)
    for r, d, n in zip(ra, dec, names):
        b = L.brick_by_name(str(n))
        assert b.brickname == n
        assert b.contains(r, d)
        assert L.brick_at(b.ra, b.dec) == b


def test_bad_names_and_coordinates():
    for bad in ("1498p02", "abcdp025", "1497p025", "1498q025", "3700p000"):
        with pytest.raises(ConfigError):
            L.brick_by_name(bad)
    with pytest.raises(ConfigError):
        L.brick_at(10.0, 91.0)
    with pytest.raises(ConfigError):
        L.brick_at(float("nan"), 0.0)


def test_bricks_in_box_and_wrap():
    bricks = L.bricks_in(149.5, 150.5, 1.5, 2.5)
    assert len(bricks) == 5 * 4  # rows 1.5..2.5, columns 149.5-149.75-...-150.5 (upper edge excluded)
    assert {b.brickname for b in bricks} >= {"1496p015", "1503p025", "1501p020"}
    assert all(b.ra1 < 150.5 and b.ra2 > 149.5 for b in bricks)
    assert [b.brickname for b in L.bricks_in(359.9, 0.1, 0.0, 0.0)] == ["0001p000", "3598p000"]
    assert [b.brickname for b in L.bricks_in(150, 150, 2, 2)] == ["1501p020"]
    assert len(L.bricks_in(0, 360, -1, 1)) == 9 * 1440
    # the 0.25 deg cells tile the sky: neighbours share edges
    row = [b for b in bricks if b.dec == 2.0]
    assert all(a.ra2 == b.ra1 for a, b in zip(row, row[1:]))


def test_brick_wcs_is_legacypipe_like():
    b = L.brick_at(150.0, 2.0)
    w = L.brick_wcs(b)
    assert list(w.wcs.crpix) == [1800.5, 1800.5]
    assert w.wcs.cd[0, 0] == pytest.approx(-0.262 / 3600) and w.wcs.cd[1, 1] == pytest.approx(0.262 / 3600)
    ra, dec = w.all_pix2world([[1799.5, 1799.5]], 0)[0]  # 0-based centre
    assert ra == pytest.approx(b.ra) and dec == pytest.approx(b.dec)
    # 3600 px of 0.262" cover more than the 0.25 deg cell: neighbouring bricks overlap
    assert L.BRICK_SIZE * L.PIXSCALE / 3600 > 0.25


def test_paths(tmp_path):
    root = tmp_path / "dr9"
    assert L.image_path(root, "1498p025", "g") == \
        root / "coadd" / "149" / "1498p025" / "legacysurvey-1498p025-image-g.fits.fz"
    assert L.image_path(root, "1498p025", "z", "invvar").name == "legacysurvey-1498p025-invvar-z.fits.fz"
    assert L.maskbits_path(root, "0001m002") == \
        root / "coadd" / "000" / "0001m002" / "legacysurvey-0001m002-maskbits.fits.fz"
    assert L.tractor_path(root, "1498p025") == root / "tractor" / "149" / "tractor-1498p025.fits"
    assert L.survey_bricks_path(root) == root / "survey-bricks.fits"
    with pytest.raises(ConfigError):
        L.image_path(root, "1498p025", "g", "model")


def test_list_bricks_and_is_survey_root(tmp_path):
    assert not L.is_survey_root(tmp_path) and L.list_bricks(tmp_path) == []
    for name in ("1501p020", "1498p025"):
        p = L.image_path(tmp_path, name, "r")
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
    (tmp_path / "coadd" / "150" / "1503p020").mkdir()  # empty brick directory: not a brick
    (tmp_path / "coadd" / "150" / "notabrick").mkdir()
    assert L.list_bricks(tmp_path) == ["1498p025", "1501p020"]
    assert L.is_survey_root(tmp_path)
    assert not L.is_survey_root(tmp_path / "coadd")
