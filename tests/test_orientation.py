"""Orientation (north up, east left, from the WCS) and the Galaxy Zoo DECaLS stretch, on real data.

The Galaxy Zoo subject images in tests/data/decals_cutouts/subjects were made from the cubes beside
them by the GZ DECaLS pipeline (zooniverse/decals, not this project): they fix both the orientation
(the survey viewer's) and the stretch independently of this code.
"""

from __future__ import annotations

import gzip
import math
import shutil

import numpy as np
import pytest
from astropy.wcs import WCS
from PIL import Image

from galaxalign_batch.preprocess import CutoutSpec, make_cutouts
from galaxalign_batch.preprocess.reference import sdss_rgb
from galaxalign_batch.survey import open_tile

VIEWER = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}


def _tile(cutouts_dir, tmp_path, name):
    path = cutouts_dir / f"{name}.fits"
    if not path.exists():  # stored gzip-compressed
        path = tmp_path / f"{name}.fits"
        with gzip.open(cutouts_dir / f"{name}.fits.gz", "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return open_tile(path)


def _whole(tile, spec_kwargs):
    """The whole cube at its own pixel scale (step 1: every output pixel is one input pixel)."""
    h, w = tile.image.shape[1:]
    spec = CutoutSpec(angular_size=w * tile.pixscale, out_size=w, **spec_kwargs)
    return make_cutouts(tile.image, tile.valid, [(w - 1) / 2], [(h - 1) / 2], tile.pixscale, spec,
                        bands=tile.bands, wcs=tile.wcs).pixels[0]


def _dihedral(img):
    """The 8 flips / quarter turns of an (H, W, C) picture, identity first."""
    out = {}
    for k in range(4):
        r = np.rot90(img, k)
        out[f"rot{90 * k}"] = r
        out[f"rot{90 * k}+flip"] = r[:, ::-1]
    return out


@pytest.mark.parametrize("name", ["example_a", "example_b", "example_c", "example_e"])
def test_gz_decals_picture_matches_the_galaxy_zoo_subject_image(cutouts_dir, tmp_path, name):
    """Measured: correlation 0.99975-0.99994, at most 1 grey level apart (GZ truncates v * 255 to
    uint8, this project rounds), mean 0.49 levels; as-is in FITS row order it is 0.55-0.80."""
    tile = _tile(cutouts_dir, tmp_path, name)
    subject = np.asarray(Image.open(cutouts_dir / "subjects" / f"{name}.png"))[..., :3].astype(np.float64)
    ours = _whole(tile, {"stretch": "gz-decals", "dtype": "uint8"}).transpose(1, 2, 0).astype(np.float64)
    assert ours.shape == subject.shape
    corr = {k: np.corrcoef(v.ravel(), subject.ravel())[0, 1] for k, v in _dihedral(ours).items()}
    assert max(corr, key=corr.get) == "rot0", corr
    assert corr["rot0"] >= 0.99, corr
    diff = np.abs(ours - subject)
    assert diff.max() <= 2 and diff.mean() < 1.0, (diff.max(), diff.mean())
    # the old convention (array order) is the vertical mirror, and measurably wrong
    fits_order = _whole(tile, {"stretch": "gz-decals", "dtype": "uint8", "orientation": "fits"})
    fits_order = fits_order.transpose(1, 2, 0).astype(np.float64)
    assert np.array_equal(fits_order[::-1], ours)
    assert np.corrcoef(fits_order.ravel(), subject.ravel())[0, 1] < 0.9


@pytest.mark.parametrize("name", ["example_a", "temp_small"])
def test_viewer_stretch_matches_legacypipe_north_up(cutouts_dir, tmp_path, name):
    """The lupton picture of a real cube is legacypipe sdss_rgb of its planes, rows reversed
    (the cubes have CD2_2 > 0: FITS row 1 is the south edge)."""
    tile = _tile(cutouts_dir, tmp_path, name)
    assert tile.wcs.wcs.cd[1, 1] > 0 > tile.wcs.wcs.cd[0, 0]
    ours = _whole(tile, {"stretch": "lupton"}).transpose(1, 2, 0)
    want = sdss_rgb(list(tile.image), list(tile.bands), VIEWER, 0.03, 20.0)[::-1]
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)


# ---- synthetic skies seen through WCSs of every handedness and rotation ----------------------------

CENTRE = (150.0, 2.0)
PIXSCALE = 0.262
# (RA, Dec offsets in arcsec east / north of the centre, flux, sigma arcsec): a galaxy, a marker 5" north,
# a fainter one 4" east
SCENE = [(0.0, 0.0, 1.0, 1.2), (0.0, 5.0, 0.6, 0.7), (4.0, 0.0, 0.3, 0.7)]


def _wcs(matrix, size):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(CENTRE)
    w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    w.wcs.cd = np.asarray(matrix, np.float64) * PIXSCALE / 3600.0
    return w


def _render(w, size):
    """The scene through ``w``: circular Gaussians placed by the WCS (the same sky in every frame)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    img = np.zeros((size, size))
    cosd = math.cos(math.radians(CENTRE[1]))
    for east, north, flux, sigma in SCENE:
        ra = CENTRE[0] + east / 3600.0 / cosd
        dec = CENTRE[1] + north / 3600.0
        px, py = w.all_world2pix([[ra, dec]], 0)[0]
        s = sigma / PIXSCALE
        img += flux * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * s * s))
    return np.repeat(img[None].astype(np.float32), 3, axis=0)


def _rotation(deg):
    t = math.radians(deg)
    return [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]


FRAMES = {
    "legacy (CD1_1 < 0, CD2_2 > 0)": [[-1, 0], [0, 1]],
    "CD1_1 > 0 (east right)": [[1, 0], [0, 1]],
    "CD2_2 < 0 (north down)": [[-1, 0], [0, -1]],
    "both flipped": [[1, 0], [0, -1]],
    "transposed axes": [[0, -1], [1, 0]],
    "transposed, mirrored": [[0, 1], [1, 0]],
    "rotated 30 deg": np.asarray(_rotation(30.0)) @ np.array([[-1, 0], [0, 1]]),
    "rotated 137 deg, east right": np.asarray(_rotation(137.0)),
}


@pytest.mark.parametrize("frame", list(FRAMES))
def test_north_up_east_left_in_any_wcs(frame):
    """Whatever the WCS, the north marker is straight above the galaxy and the east one to its left,
    and the picture equals the one from the Legacy Survey frame: exactly for the flips / quarter
    turns (measured 6e-8), within 2% of the peak for a rotated WCS (another pixel grid; measured 0.5% at
    30 deg, 1.1% at 137 deg); cut in array order instead the frames differ by 27-59% of the peak."""
    size = 121
    spec = CutoutSpec(angular_size=16.0, out_size=32, stretch="none")
    w = _wcs(FRAMES[frame], size)
    img = _render(w, size)
    x, y = w.all_world2pix([CENTRE], 0)[0]
    got = make_cutouts(img, None, [x], [y], PIXSCALE, spec, wcs=w).pixels[0, 0]
    ref_w = _wcs(FRAMES["legacy (CD1_1 < 0, CD2_2 > 0)"], size)
    ref = make_cutouts(_render(ref_w, size), None, [x], [y], PIXSCALE, spec, wcs=ref_w).pixels[0, 0]
    # markers: 0.5"/px, centre at (15.5, 15.5); north 5" -> 10 px up, east 4" -> 8 px left
    sub = got.copy()
    c = 15.5
    yy, xx = np.mgrid[:32, :32]
    sub -= np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * 2.4 ** 2))  # remove the galaxy (sigma 1.2" = 2.4 px)
    north = np.unravel_index(np.argmax(np.where(yy < c - 5, sub, -np.inf)), sub.shape)
    east = np.unravel_index(np.argmax(np.where((xx < c - 4) & (abs(yy - c) < 3), sub, -np.inf)), sub.shape)
    assert north[0] in (5, 6) and north[1] in (15, 16), north
    assert east[1] in (7, 8) and east[0] in (15, 16), east
    tol = 2e-6 if "rotated" not in frame else 0.02
    assert np.abs(got - ref).max() <= tol * ref.max(), np.abs(got - ref).max() / ref.max()


def test_rotated_wcs_keeps_masking_and_uses_the_rotated_grid():
    """A source near the corner of a 45-degree-rotated tile: the masked fraction is the footprint's
    share outside the rotated square (about 1/2 at an edge midpoint, here a corner of the sky-aligned
    cutout), and covered output pixels keep the true value."""
    size = 101
    w = _wcs(_rotation(45.0) @ np.array([[-1, 0], [0, 1]]), size)
    img = np.ones((3, size, size), np.float32)
    spec = CutoutSpec(angular_size=8.0, out_size=16, stretch="none")
    inside = make_cutouts(img, None, [50.0], [50.0], PIXSCALE, spec, wcs=w)
    edge = make_cutouts(img, None, [50.0], [0.0], PIXSCALE, spec, wcs=w)
    assert inside.masked_fraction[0] == 0.0 and np.allclose(inside.pixels, 1.0)
    assert 0.4 < edge.masked_fraction[0] < 0.6, edge.masked_fraction
    covered = edge.pixels[0, 0][edge.pixels[0, 0] != 0]
    assert covered.size > 0 and np.allclose(covered, 1.0)


def test_display_flips_only_array_order_cutouts():
    """Pictures shown by search / report / labelling: north-up cutouts as they are, old array-order
    ("fits") stores flipped vertically, as the viewer shows them."""
    from galaxalign_batch.preprocess.pictures import to_rgb8

    pix = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    assert np.array_equal(to_rgb8(pix, "north-up"), pix.transpose(1, 2, 0))
    assert np.array_equal(to_rgb8(pix, "fits"), pix.transpose(1, 2, 0)[::-1])
