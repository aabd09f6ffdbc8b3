"""Survey readers and sources: real DECaLS cutout cubes (tests/data) and small fpack bricks made here."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import fitsio
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from scipy import ndimage

from galaxalign_batch.errors import TileError
from galaxalign_batch.survey import (
    MIN_ZERO_REGION, Tile, detect_sources, layout, open_tile, read_brick, read_brick_files, read_cube, read_tractor,
    sources_for,
)

CUBES = ["example_a", "example_b", "example_bad_pix", "temp_extended", "temp_small"]
BRICK = "1498p025"
SIZE = 160
SKY_SIGMA = 0.01  # nanomaggies
GALAXIES = [(40.3, 50.7, 3.0), (110.6, 95.2, 2.0), (75.1, 130.4, 1.5)]  # x, y, flux peak (nanomaggies)
STRIP = slice(0, 12)  # rows with no coverage (invvar 0, image 0)


# --- fixtures -----------------------------------------------------------------------------------

def _brick_header(info, size=SIZE, **extra):
    cards = {"BRICKNAM": info.brickname, "BRICKID": info.brickid, "RELEASE": 9010, "SURVEY": "test",
             "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": info.ra, "CRVAL2": info.dec,
             "CRPIX1": size / 2 + 0.5, "CRPIX2": size / 2 + 0.5, "CD1_1": -layout.PIXSCALE / 3600, "CD1_2": 0.0,
             "CD2_1": 0.0, "CD2_2": layout.PIXSCALE / 3600}
    cards.update(extra)
    return [{"name": k, "value": v} for k, v in cards.items() if v is not None]


def _write_fz(path: Path, data: np.ndarray, header) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        if np.issubdtype(data.dtype, np.integer):
            f.write(data, header=header, compress="RICE")
        else:
            f.write(data, header=header, compress="RICE", qlevel=16, qmethod="SUBTRACTIVE_DITHER_2")


def make_brick(root: Path, brick: str = BRICK, bands=("g", "r", "z"), size: int = SIZE, seed: int = 1) -> dict:
    """A small Legacy-Survey-like brick: fpack image/invvar per band, maskbits, Tractor catalog."""
    info = layout.brick_by_name(brick)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    model = sum(p * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.5**2)) for x, y, p in GALAXIES)
    header = _brick_header(info, size)
    for i, band in enumerate(bands):
        image = (model * (1 + 0.3 * i) + rng.normal(0, SKY_SIGMA, (size, size))).astype(np.float32)
        invvar = np.full((size, size), 1 / SKY_SIGMA**2, np.float32)
        image[STRIP] = 0.0
        invvar[STRIP] = 0.0
        _write_fz(layout.image_path(root, brick, band), image, header)
        _write_fz(layout.image_path(root, brick, band, "invvar"), invvar, header)
    maskbits = np.zeros((size, size), np.int16)
    maskbits[:, :5] = 1  # NPRIMARY on a border
    _write_fz(layout.maskbits_path(root, brick), maskbits, header)

    wcs = open_tile(layout.image_path(root, brick, bands[0])).wcs
    xs = np.array([g[0] for g in GALAXIES] + [150.0])
    ys = np.array([g[1] for g in GALAXIES] + [150.0])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    cat = np.zeros(len(xs), dtype=[("release", "i2"), ("brickid", "i4"), ("brickname", "S8"), ("objid", "i4"),
                                   ("brick_primary", "?"), ("ra", "f8"), ("dec", "f8"), ("bx", "f4"), ("by", "f4"),
                                   ("type", "S3"), ("flux_g", "f4"), ("flux_r", "f4"), ("shape_r", "f4"),
                                   ("sersic", "f4"), ("true_class", "i2")])
    cat["release"], cat["brickid"], cat["brickname"] = 9010, info.brickid, brick
    cat["objid"] = np.arange(len(xs))
    cat["brick_primary"] = [True, True, True, False]
    cat["ra"], cat["dec"], cat["bx"], cat["by"] = ra, dec, xs, ys
    cat["type"] = [b"EXP", b"DEV", b"PSF", b"REX"]
    cat["flux_g"], cat["flux_r"] = 10.0, 20.0
    cat["true_class"] = [3, 7, 0, 1]
    tpath = layout.tractor_path(root, brick)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    fitsio.write(str(tpath), cat, clobber=True)
    return {"root": root, "brick": brick, "ra": ra, "dec": dec, "xs": xs, "ys": ys}


@pytest.fixture(scope="module")
def brick_root(tmp_path_factory) -> dict:
    return make_brick(tmp_path_factory.mktemp("survey"))


@pytest.fixture()
def brick_copy(brick_root, tmp_path) -> dict:
    root = tmp_path / "survey"
    shutil.copytree(brick_root["root"], root)
    return {**brick_root, "root": root}


def _cube_file(tmp_path: Path, data: np.ndarray, name="cube.fits", **header_changes) -> Path:
    src = fits.getheader(Path(__file__).parent / "data/decals_cutouts/example_a.fits")
    header = src.copy()
    for k, v in header_changes.items():
        if v is None:
            header.remove(k, ignore_missing=True)
        else:
            header[k] = v
    path = tmp_path / name
    fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
    return path


def _cube_data(seed=0, shape=(3, 64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.01, shape).astype(np.float32)


# --- cutout cubes -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shape,pixscale", [
    ("example_a", (424, 424), 0.1), ("example_b", (424, 424), 0.1014), ("example_bad_pix", (424, 424), 0.1302),
    ("temp_small", (225, 225), 0.262), ("temp_extended", (424, 424), 1.0),
])
def test_read_cube_real(cutouts_dir, name, shape, pixscale):
    tile = read_cube(cutouts_dir / f"{name}.fits")
    assert tile.kind == "cube" and tile.name == name
    assert tile.bands == ("g", "r", "z")
    assert tile.image.shape == (3, *shape) and tile.image.dtype == np.float32
    assert tile.valid.shape == tile.image.shape and tile.valid.dtype == bool
    assert tile.pixscale == pytest.approx(pixscale, abs=5e-4)
    assert tile.invvar is None and tile.maskbits is None
    assert tile.header["SURVEY"] == "DECaLS"
    assert np.all(tile.image[~tile.valid] == 0)
    raw = fits.getdata(cutouts_dir / f"{name}.fits").astype(np.float32)
    np.testing.assert_array_equal(tile.image[tile.valid], raw[tile.valid])


def test_same_galaxy_two_scales(cutouts_dir):
    a = read_cube(cutouts_dir / "example_a.fits")
    s = read_cube(cutouts_dir / "temp_small.fits")
    ca = SkyCoord(*a.pixel_to_world((a.shape[1] - 1) / 2, (a.shape[0] - 1) / 2), unit="deg")
    cs = SkyCoord(*s.pixel_to_world((s.shape[1] - 1) / 2, (s.shape[0] - 1) / 2), unit="deg")
    assert ca.separation(cs).arcsec < 0.01
    # the detected central galaxy is the same object
    da, ds = detect_sources(a), detect_sources(s)
    ga = da[np.argmax(da["flux"])]
    gs = ds[np.argmax(ds["flux"])]
    sep = SkyCoord(ga["ra"], ga["dec"], unit="deg").separation(SkyCoord(gs["ra"], gs["dec"], unit="deg")).arcsec
    assert sep < 0.5
    # viewer cubes keep nanomaggies per native 0.262" pixel: flux_scale makes fluxes comparable, and
    # with every detection size on the sky the Kron fluxes agree (measured 0.957 g, 0.960 r, 0.965 z;
    # 0.79-0.84 when the background mesh was a third of the tile and the noise came from sep's meshes)
    for band in "grz":
        assert ga[f"flux_{band}"] == pytest.approx(gs[f"flux_{band}"], rel=0.05)
    # what is left is example_a's smaller field (42.4"), which cuts the Kron aperture: next test


def _crop(tile: Tile, side_arcsec: float) -> Tile:
    n = int(round(side_arcsec / tile.pixscale))
    y0, x0 = (tile.shape[0] - n) // 2, (tile.shape[1] - n) // 2
    cut = (slice(None), slice(y0, y0 + n), slice(x0, x0 + n))
    return Tile(tile.name, tile.path, tile.kind, tile.bands, tile.image[cut].copy(), tile.valid[cut].copy(),
                tile.wcs[cut[1:]])


def test_kron_flux_same_field_two_scales(cutouts_dir):
    """The same galaxy on the same 42.4" field at 0.1 and 0.262 "/px: the same Kron flux, isophote and
    shape, so what differs between example_a and the whole of temp_small is the field, not the scale."""
    a = read_cube(cutouts_dir / "example_a.fits")
    s = _crop(read_cube(cutouts_dir / "temp_small.fits"), a.shape[0] * a.pixscale)
    assert s.shape == (162, 162)
    da, ds = detect_sources(a), detect_sources(s)
    ga, gs = da[np.argmax(da["flux"])], ds[np.argmax(ds["flux"])]
    for band in "grz":  # measured 1.002 g, 0.999 r, 0.998 z
        assert ga[f"flux_{band}"] == pytest.approx(gs[f"flux_{band}"], rel=0.01)
    area_a, area_s = ga["npix"] * a.pixscale**2, gs["npix"] * s.pixscale**2  # isophotal area, arcsec^2
    assert area_a == pytest.approx(area_s, rel=0.1)  # 1075 and 1031
    assert ga["a"] * a.pixscale == pytest.approx(gs["a"] * s.pixscale, rel=0.03)  # 7.38" and 7.36"
    assert ga["b"] * a.pixscale == pytest.approx(gs["b"] * s.pixscale, rel=0.03)


@pytest.mark.parametrize("name", CUBES)
def test_cube_wcs_round_trip(cutouts_dir, name):
    tile = read_cube(cutouts_dir / f"{name}.fits")
    h, w = tile.shape
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, w - 0.5, 50), rng.uniform(-0.5, h - 0.5, 50)
    ra, dec = tile.pixel_to_world(x, y)
    assert ra.dtype == np.float64 and dec.dtype == np.float64
    x2, y2 = tile.world_to_pixel(ra, dec)
    ra2, dec2 = tile.pixel_to_world(x2, y2)
    sep = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg")).arcsec
    assert sep.max() < 0.01
    np.testing.assert_allclose(x2, x, atol=1e-6)
    # 0-based convention: CRPIX (1-based) maps to CRVAL
    hdr = fits.getheader(cutouts_dir / f"{name}.fits")
    cra, cdec = tile.pixel_to_world(hdr["CRPIX1"] - 1, hdr["CRPIX2"] - 1)
    assert cra == pytest.approx(hdr["CRVAL1"], abs=1e-10) and cdec == pytest.approx(hdr["CRVAL2"], abs=1e-10)


def test_zero_coverage_bad_pix(cutouts_dir):
    tile = read_cube(cutouts_dir / "example_bad_pix.fits")
    g, r, z = (tile.coverage_fraction(b) for b in "grz")
    assert 0.2 < g < 0.3 and 0.2 < r < 0.3
    assert z == 1.0
    raw = fits.getdata(cutouts_dir / "example_bad_pix.fits")
    assert not tile.valid[0, :280].any()  # the big g gap: rows 0..288 have no g data
    assert np.array_equal(~tile.valid[0], raw[0] == 0)  # every exact zero there is in a large region
    assert tile.coverage_fraction() == pytest.approx((g + r + z) / 3)


def test_zero_rule_keeps_isolated_zeros(tmp_path):
    data = _cube_data()
    data[0, 10, 10] = 0.0  # a single exact zero: sky, stays valid
    data[1, 20:22, 30:30 + MIN_ZERO_REGION // 2] = 0.0  # a region of MIN_ZERO_REGION zeros: no coverage
    tile = read_cube(_cube_file(tmp_path, data))
    assert tile.valid[0, 10, 10]
    assert not tile.valid[1, 20:22, 30:30 + MIN_ZERO_REGION // 2].any()
    assert tile.valid.sum() == data.size - MIN_ZERO_REGION


def _numpy_coverage(image, invvar):
    """The coverage rule as NumPy expressions (the implementation before the compiled pass): the oracle."""
    from galaxalign_batch.survey.tile import zero_regions

    with np.errstate(over="ignore"):  # float64 beyond float32 reads as inf, as in the implementation
        image = np.array(image, dtype=np.float32)
    valid = np.isfinite(image)
    if invvar is not None:
        invvar = np.array(invvar, dtype=np.float32)
        valid &= np.isfinite(invvar) & (invvar > 0)
    image[~valid] = 0.0
    for b in range(len(image)):
        if np.any((image[b] == 0) & valid[b]):
            valid[b] &= ~zero_regions(image[b])
    image[~valid] = 0.0
    if invvar is not None:
        invvar[~valid] = 0.0
    return image, valid, invvar


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4", np.int16])
@pytest.mark.parametrize("with_invvar", [True, False])
def test_the_compiled_coverage_pass_is_the_numpy_rule_bit_for_bit(dtype, with_invvar):
    """NaN/inf, -0.0, float64 values beyond float32 (inf once cast), big-endian planes, isolated zeros and
    zero regions that touch pixels made invalid by NaN or by invvar <= 0 (they count as zeros)."""
    from galaxalign_batch.survey.tile import coverage, coverage_planes

    rng = np.random.default_rng(7)
    image = rng.normal(0, 1, (3, 64, 80))
    invvar = rng.uniform(0.5, 2, (3, 64, 80))
    if np.dtype(dtype).kind == "f":
        image[0, 3:6, 3:6] = np.nan
        image[0, 6, 3:6] = 0.0            # 3 zeros + 9 NaN: a region of >= MIN_ZERO_REGION once NaN reads as 0
        image[1, 10, 10] = -0.0           # an isolated (negative) zero stays valid
        image[1, 20, 20] = np.inf
        image[2, 30, 30] = 1e300 if np.dtype(dtype).itemsize == 8 else np.inf
    image[1, 40:42, 40:44] = 0.0          # a region of MIN_ZERO_REGION zeros
    image[2, 50, 50:53] = 0.0             # 3 zeros next to 6 pixels of invvar 0: one region of 9
    invvar[2, 51, 49:55] = 0.0
    if np.dtype(dtype).kind == "f":
        invvar[0, 60, 60] = np.nan
    invvar[1, 0, :] = -1.0
    image = image.astype(dtype)
    iv = invvar.astype(dtype) if with_invvar else None
    want_img, want_valid, want_iv = _numpy_coverage(image, iv)
    for got_img, got_valid, got_iv in (coverage("x", image, tuple("grz"), iv),
                                       coverage_planes("x", list(image), tuple("grz"),
                                                       None if iv is None else list(iv))):
        assert got_img.dtype == np.float32 and got_img.shape == image.shape
        assert np.array_equal(got_valid, want_valid)
        assert np.array_equal(got_img.view(np.uint32), want_img.view(np.uint32))  # -0.0 kept, bit for bit
        if with_invvar:
            assert np.array_equal(got_iv.view(np.uint32), want_iv.view(np.uint32))
        else:
            assert got_iv is None
    if np.dtype(dtype).kind == "f":
        assert not want_valid[0, 6, 3:6].any() and want_valid[1, 10, 10]
        # the 3 zeros form a region only with the 6 pixels that invvar 0 made invalid
        assert want_valid[2, 50, 50:53].any() == (not with_invvar)


@pytest.mark.parametrize("density", [0.1, 0.4, 0.5, 0.6, 0.95])
def test_zero_regions_are_scipy_label_components(density):
    """The compiled run-based labelling against ``scipy.ndimage.label`` (4-connected) on random zero
    patterns from sparse to percolating, several region-size thresholds, and a U shape whose arms only
    meet in the last row (two runs of one row joined through a later row)."""
    from galaxalign_batch.survey.tile import zero_regions

    rng = np.random.default_rng(int(density * 100))
    image = np.where(rng.random((97, 131)) < density, 0.0, rng.normal(1, 0.1, (97, 131))).astype(np.float32)
    labels, n = ndimage.label(image == 0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    for threshold in (1, 2, 8, 50):
        big = sizes >= threshold
        big[0] = False
        assert np.array_equal(zero_regions(image, threshold), big[labels]), threshold
    u = np.ones((6, 9), np.float32)
    u[:5, 1] = u[:5, 7] = 0.0  # two vertical arms of 5 zeros...
    assert not zero_regions(u, 8).any()
    u[5, 1:8] = 0.0            # ...joined by a bottom row: one region of 17
    assert zero_regions(u, 8).sum() == 17


def test_coverage_in_place_edits_the_given_float32_stack():
    from galaxalign_batch.survey.tile import coverage

    image = np.ones((3, 16, 16), np.float32)
    image[0, 0, 0] = np.nan
    out, valid, _ = coverage("x", image, tuple("grz"), copy=False)
    assert out is image and image[0, 0, 0] == 0 and not valid[0, 0, 0]
    kept = np.ones((3, 16, 16), np.float32)
    kept[0, 0, 0] = np.nan
    out, _, _ = coverage("x", kept, tuple("grz"))  # copy=True (default) leaves the input alone
    assert out is not kept and np.isnan(kept[0, 0, 0])


def test_coverage_planes_consume_drops_each_band_once_written():
    """``read_brick`` hands over its planes: each is released after its band (peak memory of a 3600-px
    brick read 783 -> 486 MB above the process's own, bench/RESULTS.md)."""
    from galaxalign_batch.survey.tile import coverage_planes

    planes = [np.full((8, 8), float(b + 1), np.float32) for b in range(3)]
    ivs = [np.ones((8, 8), np.float32) for _ in range(3)]
    image, valid, invvar = coverage_planes("x", planes, tuple("grz"), ivs, consume=True)
    assert planes == [None, None, None] and ivs == [None, None, None]
    assert valid.all() and np.array_equal(image[:, 0, 0], [1, 2, 3]) and (invvar == 1).all()
    with pytest.raises(ValueError, match="different shapes"):
        coverage_planes("x", [np.ones((8, 8)), np.ones((8, 9))], ("g", "r"))


def test_temp_extended_gap_masked(cutouts_dir):
    tile = read_cube(cutouts_dir / "temp_extended.fits")
    raw = fits.getdata(cutouts_dir / "temp_extended.fits")
    assert (~tile.valid[0]).sum() == (raw[0] == 0).sum() == 487  # the g chip-gap rows
    assert tile.valid[1:].all()


def test_nan_pixels_are_masked(tmp_path):
    data = _cube_data()
    data[2, 5:9, 5:9] = np.nan
    data[0, 40, 40] = np.inf
    tile = read_cube(_cube_file(tmp_path, data))
    assert not tile.valid[2, 5:9, 5:9].any() and not tile.valid[0, 40, 40]
    assert np.isfinite(tile.image).all() and tile.image[2, 5:9, 5:9].sum() == 0
    assert tile.valid.sum() == data.size - 17


def test_cube_pickles(cutouts_dir):
    tile = read_cube(cutouts_dir / "temp_small.fits")
    back = pickle.loads(pickle.dumps(tile))
    assert back.name == tile.name and np.array_equal(back.image, tile.image)
    assert back.pixel_to_world(3.0, 4.0) == tile.pixel_to_world(3.0, 4.0)


# --- detection ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CUBES)
def test_detect_central_galaxy(cutouts_dir, name):
    tile = read_cube(cutouts_dir / f"{name}.fits")
    det = detect_sources(tile)
    assert len(det) >= 1
    for col in ("object_id", "ra", "dec", "x", "y", "tile", "flux", "a", "b", "theta", "flags", "flux_r"):
        assert col in det.colnames
    assert det["ra"].dtype == np.float64 and det["dec"].dtype == np.float64
    h, w = tile.shape
    dist = np.hypot(det["x"] - (w - 1) / 2, det["y"] - (h - 1) / 2)
    i = int(np.argmin(dist))
    assert dist[i] * tile.pixscale < max(1.0, 2.5 * tile.pixscale)  # arcsec
    assert i == int(np.argmax(det["flux"]))  # and it is the brightest detection
    # ra/dec agree with the WCS (astropy's high-level API, independently)
    sky = tile.wcs.pixel_to_world(np.asarray(det["x"]), np.asarray(det["y"]))
    sep = sky.separation(SkyCoord(det["ra"], det["dec"], unit="deg")).arcsec
    assert sep.max() < 1e-6
    # ids: unique, in (y, x) order, named after the tile
    assert len(set(det["object_id"])) == len(det)
    assert list(det["object_id"]) == [f"{name}/det{k}" for k in range(len(det))]
    assert np.all(np.diff(np.asarray(det["y"])) >= 0)
    assert set(det["tile"]) == {name}


def test_detection_is_deterministic_and_cubes_detect(cutouts_dir):
    tile = read_cube(cutouts_dir / "example_bad_pix.fits")
    d1, d2 = detect_sources(tile), detect_sources(tile)
    assert list(d1["object_id"]) == list(d2["object_id"])
    np.testing.assert_array_equal(d1["x"], d2["x"])
    auto = sources_for(tile)  # a cube has no catalog: detection
    assert list(auto["object_id"]) == list(d1["object_id"]) and "catalog" not in auto.meta


def _noise_tile(image: np.ndarray, invvar=None) -> Tile:
    wcs = layout.brick_wcs(layout.brick_by_name(BRICK), image.shape[2], image.shape[1])
    return Tile("noise", "noise.fits", "brick", ("g", "r", "z"), image, np.ones(image.shape, bool), wcs,
                invvar=invvar)


def test_detection_false_positives():
    rng = np.random.default_rng(3)
    white = rng.normal(0, SKY_SIGMA, (3, 500, 500)).astype(np.float32)
    det = detect_sources(_noise_tile(white, np.full_like(white, 1 / SKY_SIGMA**2)))
    assert len(det) == 0 and det.meta["detection"]["noise_correlation"] == 1.0
    assert det.colnames[:6] == ["object_id", "ra", "dec", "x", "y", "tile"]
    # correlated noise (as in coadds and resampled cubes): the threshold follows the measured noise
    smooth = np.stack([ndimage.gaussian_filter(b, 1.5) for b in white])
    smooth *= SKY_SIGMA / smooth.std()
    det = detect_sources(_noise_tile(smooth))
    assert det.meta["detection"]["noise_correlation"] > 1.5
    assert len(det) <= 3


def test_detection_sizes_of_a_brick():
    """On the native 0.262"/px grid the sky sizes are the former pixel counts: the 3x3 default.conv,
    5 px minimum area, 256 px background meshes; finer grids get the same angles."""
    from galaxalign_batch.survey.sources import DETECTION_KERNEL, _background_box, detection_kernel, native_area

    np.testing.assert_array_equal(detection_kernel(layout.PIXSCALE), DETECTION_KERNEL)
    np.testing.assert_array_equal(detection_kernel(1.0), DETECTION_KERNEL)  # never below 3x3 px
    fine = detection_kernel(0.1)
    assert fine.shape == (11, 11) and fine[5, 5] == fine.max() and np.array_equal(fine, fine.T)
    assert native_area(layout.PIXSCALE, 5) == pytest.approx(5) and round(native_area(0.1, 5)) == 34
    brick = _noise_tile(np.zeros((3, 3600, 3600), np.float32))
    assert _background_box(brick, None) == (256, 256)
    assert _background_box(_noise_tile(np.zeros((3, 100, 120), np.float32)), None) == (100, 120)  # one mesh


def test_sky_with_most_of_the_tile_excluded():
    """sep gives a background of 0 when every mesh is more than half masked; the clipped mode of the
    pixels left is used instead."""
    from galaxalign_batch.survey.sources import sky_background

    rng = np.random.default_rng(1)
    image = (5.0 + rng.normal(0, 1, (200, 200))).astype(np.float32)
    exclude = np.zeros(image.shape, bool)
    exclude[:140] = True  # 70 %: the single mesh is unusable for sep
    back = sky_background(image, exclude, (200, 200))
    assert back.shape == image.shape and np.all(back == back[0, 0])
    assert back[0, 0] == pytest.approx(5.0, abs=0.05)
    exclude[:] = False
    exclude[:60] = True  # 30 %: sep's own mesh
    assert sky_background(image, exclude, (200, 200)).mean() == pytest.approx(5.0, abs=0.05)


def test_noise_under_a_galaxy_filling_the_tile():
    """White noise under a galaxy as big as the tile: its light must not be taken for noise (sep's
    mesh rms gave a noise correlation of 1.25 here, raising the threshold and shrinking the isophote)."""
    rng = np.random.default_rng(5)
    n = 240
    yy, xx = np.mgrid[0:n, 0:n]
    disc = 2.0 * np.exp(-np.hypot(xx - 119.5, yy - 119.5) / 15.0)  # exponential, scale 15 px
    image = np.stack([disc * f + rng.normal(0, SKY_SIGMA, (n, n)) for f in (0.5, 1.0, 1.5)]).astype(np.float32)
    tile = _noise_tile(image)
    det = detect_sources(tile)
    assert det.meta["detection"]["noise_correlation"] < 1.1  # measured 1.03
    g = det[np.argmax(det["flux"])]
    assert np.hypot(g["x"] - 119.5, g["y"] - 119.5) < 0.5
    assert g["flux_r"] == pytest.approx(disc.sum(), rel=0.07)  # 0.945 of it; 2.5 Kron radii hold ~96 %


# --- bricks -------------------------------------------------------------------------------------

def test_read_brick(brick_root):
    root, brick = brick_root["root"], brick_root["brick"]
    tile = read_brick(root, brick)
    assert tile.kind == "brick" and tile.name == brick and tile.bands == ("g", "r", "z")
    assert tile.image.shape == (3, SIZE, SIZE) and tile.image.dtype == np.float32
    assert tile.invvar.shape == tile.image.shape and tile.maskbits.shape == (SIZE, SIZE)
    assert tile.pixscale == pytest.approx(layout.PIXSCALE, rel=1e-6)
    assert tile.header["BRICKNAME"] == brick and tile.header["BRICKID"] == layout.brick_by_name(brick).brickid
    assert not tile.valid[:, STRIP].any() and tile.valid[:, STRIP.stop:].all()
    assert np.all(tile.image[:, STRIP] == 0)
    assert tile.maskbits[:, :5].all() and not tile.maskbits[:, 5:].any()
    # pixel values survive fpack quantisation to a small fraction of the noise
    x, y, peak = GALAXIES[0]
    assert tile.image[1, round(y), round(x)] == pytest.approx(peak * 1.3, abs=5 * SKY_SIGMA)
    assert np.std(tile.image[0, 140:, 140:]) == pytest.approx(SKY_SIGMA, rel=0.2)
    # WCS round trip and centre on the brick centre
    info = layout.brick_by_name(brick)
    cra, cdec = tile.pixel_to_world((SIZE - 1) / 2, (SIZE - 1) / 2)
    assert SkyCoord(cra, cdec, unit="deg").separation(SkyCoord(info.ra, info.dec, unit="deg")).arcsec < 1e-6
    rng = np.random.default_rng(1)
    ra = info.ra + rng.uniform(-0.005, 0.005, 30)
    dec = info.dec + rng.uniform(-0.005, 0.005, 30)
    ra2, dec2 = tile.pixel_to_world(*tile.world_to_pixel(ra, dec))
    assert SkyCoord(ra, dec, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg")).arcsec.max() < 0.01


def test_open_tile_dispatch(brick_root, cutouts_dir):
    root, brick = brick_root["root"], brick_root["brick"]
    full = open_tile(root, brick)
    for path in (layout.image_path(root, brick, "r"), layout.image_path(root, brick, "z", "invvar"),
                 layout.maskbits_path(root, brick)):
        tile = open_tile(path)
        assert tile.kind == "brick" and tile.bands == ("g", "r", "z") and tile.name == brick
        np.testing.assert_array_equal(tile.image, full.image)
        assert tile.invvar is not None and tile.maskbits is not None
    assert open_tile(cutouts_dir / "temp_small.fits").kind == "cube"
    with pytest.raises(TileError, match="is a directory"):
        open_tile(root)


def test_read_brick_files_without_invvar(brick_root):
    root, brick = brick_root["root"], brick_root["brick"]
    tile = read_brick_files({b: layout.image_path(root, brick, b) for b in ("z", "g")})
    assert tile.bands == ("z", "g") and tile.invvar is None and tile.name == brick
    assert not tile.valid[:, STRIP].any()  # the zero strip is still no coverage (zero-region rule)


def test_tractor_primary(brick_root):
    root, brick = brick_root["root"], brick_root["brick"]
    cat = read_tractor(layout.tractor_path(root, brick))
    assert len(cat) == 3 and list(cat["object_id"]) == [f"9010/{brick}/{i}" for i in range(3)]
    assert cat["ra"].dtype == np.float64 and cat["x"].dtype == np.float64
    assert list(cat["type"]) == ["EXP", "DEV", "PSF"]
    assert list(cat["true_class"]) == [3, 7, 0] and "flux_r" in cat.colnames and "sersic" in cat.colnames
    assert set(cat["tile"]) == {brick}
    every = read_tractor(layout.tractor_path(root, brick), primary_only=False)
    assert len(every) == 4 and every["object_id"][3] == f"9010/{brick}/3"


def test_empty_tractor(tmp_path, brick_root):
    path = tmp_path / "tractor-empty.fits"
    cat = fitsio.read(str(layout.tractor_path(brick_root["root"], BRICK)))[:0]
    fitsio.write(str(path), cat)
    out = read_tractor(path)
    assert len(out) == 0 and {"object_id", "ra", "dec", "x", "y", "tile", "flux_r"} <= set(out.colnames)


def test_sources_for_brick_uses_tractor(brick_root, cutouts_dir):
    root, brick = brick_root["root"], brick_root["brick"]
    tile = read_brick(root, brick)
    src = sources_for(tile)
    assert len(src) == 3 and src.meta["catalog"].endswith(f"tractor-{brick}.fits")
    np.testing.assert_allclose(src["x"], brick_root["xs"][:3], atol=1e-4)
    # positions through the tile's WCS agree with bx, by
    x, y = tile.world_to_pixel(src["ra"], src["dec"])
    np.testing.assert_allclose(x, src["x"], atol=1e-3)
    np.testing.assert_allclose(y, src["y"], atol=1e-3)
    # detection on the brick finds the three galaxies, none in the uncovered strip
    det = sources_for(tile, catalog=None)
    assert det["object_id"][0] == f"{brick}/det0"
    for x0, y0, _ in GALAXIES:
        assert np.min(np.hypot(det["x"] - x0, det["y"] - y0)) < 0.5
    assert np.all(det["y"] >= STRIP.stop - 0.5)
    # a catalog placed on another tile goes through that tile's WCS and drops what falls off it
    cube = read_cube(cutouts_dir / "temp_small.fits")
    assert len(read_tractor(layout.tractor_path(root, brick), tile=cube)) == 0


# --- bad input ----------------------------------------------------------------------------------

def _raises(path_part: str, reason: str, fn, *args, **kw) -> TileError:
    with pytest.raises(TileError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert path_part in msg and reason in msg, msg
    assert "\n" not in msg
    return info.value


def test_truncated_cube(cutouts_dir):
    err = _raises("example_incomplete.fits", "truncated FITS file (expected 2162880 bytes, found 1389044)",
                  read_cube, cutouts_dir / "example_incomplete.fits")
    assert err.reason.startswith("truncated")
    _raises("example_incomplete.fits", "truncated", open_tile, cutouts_dir / "example_incomplete.fits")


def test_truncated_brick_band(brick_copy):
    root, brick = brick_copy["root"], brick_copy["brick"]
    path = layout.image_path(root, brick, "r")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    _raises(path.name, "truncated FITS file", read_brick, root, brick)
    path.write_bytes(data[: 2880 + 1000])  # cut inside the compressed HDU's header
    _raises(path.name, "truncated FITS file", read_brick, root, brick)


def test_missing_band(brick_copy):
    root, brick = brick_copy["root"], brick_copy["brick"]
    layout.image_path(root, brick, "r").unlink()
    _raises(f"legacysurvey-{brick}-image-r.fits.fz", "missing band r", read_brick, root, brick)
    _raises(f"legacysurvey-{brick}-image-r.fits.fz", "missing band r", open_tile, layout.image_path(root, brick, "g"))


def test_missing_invvar(brick_copy):
    root, brick = brick_copy["root"], brick_copy["brick"]
    layout.image_path(root, brick, "z", "invvar").unlink()
    _raises(f"legacysurvey-{brick}-invvar-z.fits.fz", "missing invvar for band z", read_brick, root, brick)
    assert read_brick(root, brick, with_invvar=False).invvar is None


def test_band_grids_disagree(brick_copy):
    root, brick = brick_copy["root"], brick_copy["brick"]
    info = layout.brick_by_name(brick)
    img = np.random.default_rng(0).normal(0, SKY_SIGMA, (SIZE, SIZE)).astype(np.float32)
    _write_fz(layout.image_path(root, brick, "z"), img, _brick_header(info, CRPIX1=SIZE / 2 + 3.5))
    _raises("image-z", "different WCS", read_brick, root, brick, with_invvar=False)
    _write_fz(layout.image_path(root, brick, "z"), img[:, :100], _brick_header(info))
    _raises("image-z", "band z is 100x160 px", read_brick, root, brick, with_invvar=False)


def test_empty_brick(brick_copy):
    root, brick = brick_copy["root"], brick_copy["brick"]
    for band in "grz":
        _write_fz(layout.image_path(root, brick, band, "invvar"), np.zeros((SIZE, SIZE), np.float32),
                  _brick_header(layout.brick_by_name(brick)))
    _raises("image-g", "no valid pixels", read_brick, root, brick)


def test_zero_size_image(tmp_path):
    path = tmp_path / "empty.fits"
    fits.PrimaryHDU(np.zeros((3, 0, 0), np.float32)).writeto(path)
    _raises("empty.fits", "no image HDU with data", read_cube, path)


def test_all_nan_band(tmp_path):
    data = _cube_data()
    data[1] = np.nan
    _raises("nanband.fits", "band r is entirely NaN/inf", read_cube, _cube_file(tmp_path, data, "nanband.fits"))


def test_all_zero_cube(tmp_path):
    _raises("zeros.fits", "no valid pixels", read_cube,
            _cube_file(tmp_path, np.zeros((3, 32, 32), np.float32), "zeros.fits"))


@pytest.mark.parametrize("changes,reason", [
    ({"CTYPE1": None, "CTYPE2": None}, "no CTYPE"),
    ({"CD1_1": None, "CD1_2": None, "CD2_1": None, "CD2_2": None}, "no CD matrix"),
    ({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"}, "not celestial"),
    ({"CD1_1": 0.0, "CD2_2": 0.0}, "singular"),
])
def test_unusable_wcs(tmp_path, changes, reason):
    path = _cube_file(tmp_path, _cube_data(), "nowcs.fits", **changes)
    _raises("nowcs.fits", "header has no usable WCS", read_cube, path)
    _raises("nowcs.fits", reason, read_cube, path)


def test_not_fits_and_missing(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("this is not a FITS file\n" * 200)
    _raises("notes.fits", "not a FITS file", read_cube, text)
    _raises("notes.fits", "not a FITS file", open_tile, text)
    _raises("nothere.fits", "file does not exist", open_tile, tmp_path / "nothere.fits")
    _raises("nothere.fits", "file does not exist", read_tractor, tmp_path / "nothere.fits")
    empty = tmp_path / "zero.fits"
    empty.write_bytes(b"")
    _raises("zero.fits", "empty file", read_cube, empty)


def test_bad_tractor(tmp_path, cutouts_dir):
    _raises("example_a.fits", "no table HDU", read_tractor, cutouts_dir / "example_a.fits")
    path = tmp_path / "tractor-x.fits"
    fitsio.write(str(path), np.zeros(3, dtype=[("ra", "f8"), ("dec", "f8")]))
    _raises("tractor-x.fits", "missing column(s) release, brickname, objid", read_tractor, path)


def test_gzip_cube_reads_like_the_plain_one(cutouts_dir, tmp_path):
    """A whole-file gzip cube (.fits.gz, which tile resolution accepts) reads to the same pixels, and a
    truncated one is a one-line TileError, not a traceback from the decompressor."""
    import gzip

    plain = tmp_path / "example_a.fits"
    plain.write_bytes((cutouts_dir / "example_a.fits").read_bytes())
    gz = tmp_path / "example_a.fits.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = open_tile(plain), open_tile(gz)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.valid, b.valid)
    cut = tmp_path / "cut.fits.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(TileError, match="gzip"):
        open_tile(cut)
