"""Detection quality: one-to-one sky matching, completeness/purity/pairs with known answers, a simulated brick."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from galaxalign_batch.survey.detection_quality import (DetectionError, compare_catalogs, compare_tile, flux_to_mag,
                                                   match_catalogs)

RA0, DEC0 = 150.0, 2.0
ARCSEC = 1.0 / 3600.0


def offset(dx_arcsec, dy_arcsec):
    """(ra, dec) of points offset by (east, north) arcsec from (RA0, DEC0)."""
    dx, dy = np.asarray(dx_arcsec, float), np.asarray(dy_arcsec, float)
    return RA0 + dx * ARCSEC / np.cos(np.radians(DEC0)), DEC0 + dy * ARCSEC


def mag_flux(mag):
    return 10 ** ((22.5 - np.asarray(mag, float)) / 2.5)


def test_flux_to_mag():
    np.testing.assert_allclose(flux_to_mag([1.0, 100.0]), [22.5, 17.5])
    assert np.isnan(flux_to_mag([0.0, -1.0])).all()


def test_match_is_one_to_one_and_nearest_first():
    ref_ra, ref_dec = offset([0, 100], [0, 0])
    det_ra, det_dec = offset([0.3, 0.1, 100.5, 300], [0, 0, 0, 0])
    r2d, d2r, sep = match_catalogs(det_ra, det_dec, ref_ra, ref_dec, 1.0)
    assert r2d.tolist() == [1, 2]          # the nearer of the two candidates wins
    assert d2r.tolist() == [-1, 0, 1, -1]  # the other stays unmatched
    np.testing.assert_allclose(sep, [0.1, 0.5], atol=1e-6)
    # per-source radii: a 3" offset matches only a source whose radius reaches it
    r2d, _, _ = match_catalogs(*offset([3.0], [0.0]), *offset([0.0], [0.0]), ref_radius_arcsec=[2.0])
    assert r2d.tolist() == [-1]
    r2d, _, _ = match_catalogs(*offset([3.0], [0.0]), *offset([0.0], [0.0]), ref_radius_arcsec=[3.5])
    assert r2d.tolist() == [0]
    with pytest.raises(DetectionError, match="radius"):
        match_catalogs(det_ra, det_dec, ref_ra, ref_dec, 0.0)


def synthetic():
    """10 reference sources 60" apart (mags 16.5 x5, 18.5 x5); 7 found within 0.4", one 3" off (missed at
    radius 1.5" for a point source), 2 spurious detections far from everything, 1 fragment of a galaxy."""
    x = np.arange(10) * 60.0
    ref_ra, ref_dec = offset(x, np.zeros(10))
    ref = Table({"ra": ref_ra, "dec": ref_dec, "true_mag_r": [16.5] * 5 + [18.5] * 5,
                 "true_r_half": [0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 2.0, 2.0, 2.0],
                 "true_class_key": ["star", "star", "disk", "disk", "disk", "star", "star", "disk", "disk", "disk"],
                 "psfsize_r": np.full(10, 1.2)})
    found = [0, 1, 2, 3, 5, 7, 8]            # 4 of the bright, 3 of the faint
    dx = np.concatenate([x[found] + 0.4, [x[6] + 3.0], [x[9] + 1000.0, x[9] + 2000.0], [x[2] + 4.0]])
    det_ra, det_dec = offset(dx, np.zeros(len(dx)))
    mags = [16.5, 16.5, 16.5, 16.5, 18.5, 18.5, 18.5, 18.5, 20.5, 20.5, 19.5]
    det = Table({"ra": det_ra, "dec": det_dec, "flux_r": mag_flux(mags)})
    return det, ref


def test_completeness_purity_and_fragments_are_exact():
    det, ref = synthetic()
    rep = compare_catalogs(det, ref, radius_arcsec=1.5, size_factor=1.0, mag_bins=(16, 17, 18, 19, 21))
    assert rep.totals["reference"] == 10 and rep.totals["detections"] == 11
    assert rep.totals["matched"] == 7
    assert rep.totals["completeness"] == pytest.approx(0.7)
    assert rep.totals["purity"] == pytest.approx(7 / 11)
    assert rep.totals["fragments"] == 1 and rep.totals["spurious"] == 3  # the 3"-off star detection is spurious too
    c = {r["mag_bin"]: r for r in rep.as_dict()["completeness"]}
    assert (c["16-17"]["n_reference"], c["16-17"]["n_detected"]) == (5, 4)
    assert (c["18-19"]["n_reference"], c["18-19"]["n_detected"]) == (5, 3)
    assert c["16-17"]["star_completeness"] == 1.0 and c["18-19"]["galaxy_completeness"] == pytest.approx(2 / 3)
    p = {r["mag_bin"]: r for r in rep.as_dict()["purity"]}
    assert (p["16-17"]["n_detections"], p["16-17"]["n_matched"]) == (4, 4)
    assert (p["18-19"]["n_detections"], p["18-19"]["n_matched"]) == (4, 3)
    assert (p["19-21"]["n_detections"], p["19-21"]["n_matched"], p["19-21"]["n_fragments"]) == (3, 0, 1)
    by_class = {r["class"]: r["completeness"] for r in rep.as_dict()["by_class"]}
    assert by_class == {"disk": pytest.approx(4 / 6), "star": pytest.approx(3 / 4)}
    off = {r["sources"]: r for r in rep.as_dict()["offsets"]}
    assert off["all"]["n_matched"] == 7 and off["all"]["median"] == pytest.approx(0.4, abs=1e-4)
    assert off["all"]["mean_dra_cosdec"] == pytest.approx(0.4, abs=1e-4)
    # the 3"-off detection of a 2"-radius galaxy would match with a larger size factor; of a star it never does
    assert compare_catalogs(det, ref, radius_arcsec=3.5).totals["matched"] == 8
    # counted masks restrict the statistics, not the matching
    rep2 = compare_catalogs(det, ref, counted_reference=np.arange(10) < 5, counted_detections=np.arange(11) < 4)
    assert rep2.totals["completeness"] == pytest.approx(0.8) and rep2.totals["purity"] == 1.0


def test_blended_pairs_resolved_and_merged():
    # pair A: two stars 0.5" apart (well inside one FWHM), one detection -> merged;
    # pair B: two stars 4" apart (> 2 x (R1 + R2) with R = FWHM/2 = 0.6"), two detections -> resolved
    ref_ra, ref_dec = offset([0, 0.5, 100, 104], [0, 0, 0, 0])
    ref = Table({"ra": ref_ra, "dec": ref_dec, "true_mag_r": [18.0] * 4, "true_class_key": ["star"] * 4})
    det_ra, det_dec = offset([0.2, 100, 104], [0, 0, 0])
    det = Table({"ra": det_ra, "dec": det_dec, "flux_r": mag_flux([17.3, 18, 18])})
    rep = compare_catalogs(det, ref, radius_arcsec=1.0, fwhm_arcsec=1.2, pair_bins=(0, 1, 5))
    rows = {r["sep_over_R1+R2"]: r for r in rep.as_dict()["pairs"]}
    assert (rows["0-1"]["n_pairs"], rows["0-1"]["merged"], rows["0-1"]["resolved"]) == (1, 1, 0)
    assert (rows["1-5"]["n_pairs"], rows["1-5"]["resolved"], rows["1-5"]["resolved_fraction"]) == (1, 1, 1.0)
    # pairs with a member fainter than the limit are left out
    assert compare_catalogs(det, ref, fwhm_arcsec=1.2, pair_mag_limit=17.5).totals["pairs"] == 0


def test_tractor_magnitudes_and_bad_input():
    det, ref = synthetic()
    tractor = Table({"ra": ref["ra"], "dec": ref["dec"], "flux_r": mag_flux(ref["true_mag_r"]),
                     "type": ["PSF", "PSF", "EXP", "EXP", "EXP", "PSF", "PSF", "EXP", "EXP", "EXP"],
                     "shape_r": ref["true_r_half"]})
    rep = compare_catalogs(det, tractor, radius_arcsec=1.5)
    assert rep.settings["magnitudes"] == "flux" and rep.totals["matched"] == 7 and rep.totals["fragments"] == 1
    with pytest.raises(DetectionError, match="missing column.*dec"):
        compare_catalogs(det, Table({"ra": [1.0]}))
    with pytest.raises(DetectionError, match="missing column.*flux_r"):
        compare_catalogs(Table({"ra": det["ra"], "dec": det["dec"]}), ref)
    with pytest.raises(DetectionError, match="empty"):
        compare_catalogs(det, ref[:0])
    with pytest.raises(DetectionError, match="no true_mag_r or flux_r"):
        compare_catalogs(det, Table({"ra": ref["ra"], "dec": ref["dec"]}))
    none = compare_catalogs(det[:0], ref)
    assert none.totals["completeness"] == 0.0 and np.isnan(none.totals["purity"])


@pytest.fixture(scope="module")
def tiny_survey(tmp_path_factory):
    from galaxalign_batch.simulate import simulate_survey

    root = tmp_path_factory.mktemp("detsim") / "sim"
    simulate_survey(root, bricks=1, size=400, seed=3, no_coverage=0.0)
    return root


def test_detection_on_a_simulated_brick(tiny_survey):
    from galaxalign_batch.survey.detection_quality import combine
    from galaxalign_batch.survey import layout, open_tile

    brick = layout.list_bricks(tiny_survey)[0]
    c = compare_tile(open_tile(tiny_survey, brick))
    assert "true_mag_r" in c.reference.colnames and "true_r_half" in c.reference.colnames
    assert c.counted_reference.sum() >= 5
    rep = combine([c])
    # bright isolated simulated sources are found; nearly every detection is a source or a piece of one
    assert rep.totals["completeness"] >= 0.7
    assert (rep.totals["matched_detections"] + rep.totals["fragments"]) / rep.totals["detections"] >= 0.9
    stars = {r["sources"]: r for r in rep.as_dict()["offsets"]}
    assert stars["all"]["median"] < 0.3


def test_cube_without_catalog_is_refused(cutouts_dir):
    from galaxalign_batch.survey import open_tile

    with pytest.raises(DetectionError, match="no Tractor or truth catalog"):
        compare_tile(open_tile(cutouts_dir / "example_a.fits"))
