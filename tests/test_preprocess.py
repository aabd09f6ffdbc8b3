"""Preprocessing: Numba cutouts vs the NumPy reference, centre/edge/mask conventions, stretch, dtypes, spec."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.preprocess import CutoutBatch, CutoutSpec, make_cutouts
from galaxalign_batch.preprocess.reference import reference_cutouts, sdss_rgb

VIEWER = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}


def _image(rng, shape=(3, 90, 110)):
    """Sky noise plus a few galaxies, nanomaggies; some invalid pixels and a NaN."""
    nb, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(0.0, 0.01, shape)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, 8)
        img += rng.uniform(0.2, 2.0, (nb, 1, 1)) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    valid = rng.random(shape) > 0.03
    valid[1, 10:30, 40:70] = False  # a hole in r
    img[~valid] = 0.0
    img[2, 50, 60] = np.nan  # non-finite: always invalid
    return img.astype(np.float32), valid


def _positions(rng, h, w, n=12):
    """Interior sources plus sources on every edge and at the corners (pixel centres and between)."""
    x = list(rng.uniform(20, w - 20, n)) + [0.0, w - 1.0, 0.0, w - 1.0, -3.2, w + 2.5, w / 2, 17.3]
    y = list(rng.uniform(20, h - 20, n)) + [0.0, 0.0, h - 1.0, h - 1.0, h / 2, 7.7, -0.5, h - 0.4]
    return np.array(x), np.array(y)


# step = angular_size / out_size / pixscale: 20/32/0.262 = 2.39 (box), 20/32/0.125 = 5 (box, integer),
# 20/32/0.625 = 1.0 (exactly 1), 20/31/1.5 = 0.43 (bilinear)
CASES = [(20.0, 32, 0.262), (20.0, 32, 0.125), (20.0, 32, 0.625), (20.0, 31, 1.5), (12.0, 17, 0.262)]


@pytest.mark.parametrize("stretch", ["lupton", "asinh", "none"])
@pytest.mark.parametrize("angular_size,out_size,pixscale", CASES)
def test_kernel_matches_numpy_reference(stretch, angular_size, out_size, pixscale):
    rng = np.random.default_rng(out_size)
    img, valid = _image(rng)
    x, y = _positions(rng, *img.shape[1:])
    spec = CutoutSpec(angular_size=angular_size, out_size=out_size, stretch=stretch, fill=0.25)
    got = make_cutouts(img, valid, x, y, pixscale, spec)
    want, want_masked = reference_cutouts(img, valid, x, y, pixscale, spec)
    assert isinstance(got, CutoutBatch) and len(got) == len(x)
    assert got.pixels.shape == (len(x), 3, out_size, out_size) and got.pixels.dtype == np.float32
    assert got.masked_fraction.dtype == np.float32
    atol = 2e-6 if stretch != "none" else 1e-6
    np.testing.assert_allclose(got.pixels, want, rtol=2e-6, atol=atol)
    np.testing.assert_allclose(got.masked_fraction, want_masked, rtol=0, atol=1e-6)
    assert np.all(got.masked_fraction[12:16] > 0.7)  # the four corners: about 3/4 off the image


@pytest.mark.parametrize("orientation", ["fits", "north-up"])
@pytest.mark.parametrize("out_size", [16, 17])
@pytest.mark.parametrize("pixscale", [0.262, 0.1, 1.0])
def test_centre_convention_on_a_linear_ramp(out_size, pixscale, orientation):
    """Output pixel (i, j) is centred on (x + (j - (S-1)/2) step, y + (i - (S-1)/2) step) in array
    order ("fits"); north-up (no WCS: the Legacy Survey convention, +y = north) reverses the rows.

    Bilinear samples of a plane and box averages over a whole number of pixels are exactly its
    values there; for a fractional step the box average of the pixelised (staircase) plane is off
    by at most slope / (8 step) per axis.
    """
    h, w = 200, 240
    yy, xx = np.mgrid[:h, :w]
    slopes = [(0.01, 0.02), (-0.003, 0.0), (0.0, 0.004)]
    img = np.stack([0.5 + ax * xx + ay * yy for ax, ay in slopes]).astype(np.float32)
    spec = CutoutSpec(angular_size=8.0, out_size=out_size, stretch="none", orientation=orientation)
    step = spec.step(pixscale)
    exact = step <= 1 or abs(step - round(step)) < 1e-9
    x, y = np.array([120.0, 101.37]), np.array([100.0, 87.62])
    got = make_cutouts(img, None, x, y, pixscale, spec)
    offsets = (np.arange(out_size) - (out_size - 1) / 2) * step
    for n in range(2):
        cx, cy = np.meshgrid(x[n] + offsets, y[n] + offsets)  # rows follow y, columns x
        if orientation == "north-up":
            cx, cy = cx[::-1], cy[::-1]
        for b, (ax, ay) in enumerate(slopes):
            want = 0.5 + ax * cx + ay * cy
            tol = 2e-6 * np.abs(want).max() + (0 if exact else (abs(ax) + abs(ay)) / (8 * step))
            assert np.abs(got.pixels[n, b] - want).max() <= tol
        assert got.masked_fraction[n] == 0.0
    if not exact:  # and the error is really there: the box filter integrates pixels, it does not sample
        assert np.abs(got.pixels[0, 0] - (0.5 + 0.01 * cx + 0.02 * cy)).max() > 1e-5


@pytest.mark.parametrize("pixscale", [0.25, 1.0])
def test_source_at_a_corner_has_three_quarters_masked(pixscale):
    h, w = 300, 300
    img = np.ones((3, h, w), np.float32)
    spec = CutoutSpec(angular_size=32.0, out_size=64, stretch="none", orientation="fits")
    step = spec.step(pixscale)  # 2.0 (box) or 0.5 (bilinear)
    got = make_cutouts(img, None, [0.0, w - 1.0], [0.0, h - 1.0], pixscale, spec)
    if step > 1:  # footprint [-32 step, 32 step] around pixel 0; the image starts at -0.5
        inside = (32 * step + 0.5) / (64 * step)
    else:  # bilinear: sample centres (j - 31.5) * step; weight inside is 1 for c >= 0, 1 + c for -1 < c < 0
        c = (np.arange(64) - 31.5) * step
        inside = np.clip(1 + np.minimum(c, 0), 0, 1).mean()
    assert abs(got.masked_fraction[0] - (1 - inside ** 2)) < 1e-6
    assert abs(got.masked_fraction[1] - (1 - inside ** 2)) < 1e-6
    assert 0.70 < got.masked_fraction[0] < 0.75
    # the covered quadrant keeps the true value (renormalised, not diluted by the outside)
    assert np.allclose(got.pixels[0][:, 40:, 40:], 1.0, atol=1e-6)
    assert np.all(got.pixels[0][:, :20, :20] == 0.0)  # no data at all: fill
    # north up: the image lies north (up) and west (right) of a source on its pixel (0, 0)
    up = make_cutouts(img, None, [0.0], [0.0], pixscale, CutoutSpec(angular_size=32.0, out_size=64, stretch="none"))
    assert up.masked_fraction[0] == got.masked_fraction[0]
    assert np.allclose(up.pixels[0][:, :24, 40:], 1.0, atol=1e-6) and np.all(up.pixels[0][:, 44:, :20] == 0.0)


def test_invalid_pixels_are_excluded_not_treated_as_zero_sky():
    h, w = 120, 120
    img = np.full((3, h, w), 2.0, np.float32)
    valid = np.ones(img.shape, bool)
    valid[:, 50:70, 50:70] = False
    img[~valid] = 0.0  # the convention: invalid pixels hold 0
    spec = CutoutSpec(angular_size=32.0, out_size=32, stretch="none", fill=-1.0)
    got = make_cutouts(img, valid, [60.0], [60.0], 0.5, spec)  # step 2
    p = got.pixels[0]
    assert np.all((p == -1.0) | (np.abs(p - 2.0) < 1e-6))  # never pulled towards 0 by the hole
    assert np.sum(p == -1.0) > 0
    # masked weight = invalid area / footprint area (the hole lies fully inside the 64 px footprint)
    assert abs(got.masked_fraction[0] - 400 / 64 ** 2) < 1e-6
    # the same hole as NaN without a mask gives the same result
    nan_img = img.copy()
    nan_img[~valid] = np.nan
    got_nan = make_cutouts(nan_img, None, [60.0], [60.0], 0.5, spec)
    np.testing.assert_array_equal(got_nan.pixels, got.pixels)
    np.testing.assert_array_equal(got_nan.masked_fraction, got.masked_fraction)
    # a band-specific hole only masks that band's plane; the stretch uses the others
    valid_r = np.ones(img.shape, bool)
    valid_r[1] = False
    lup = make_cutouts(np.full(img.shape, 2.0, np.float32), valid_r, [60.0], [60.0], 0.5, CutoutSpec(out_size=32, fill=0.0))
    assert np.all(lup.pixels[0, 1] == 0.0) and np.all(lup.pixels[0, [0, 2]] > 0.5)
    assert abs(lup.masked_fraction[0] - 1 / 3) < 1e-6


def test_fast_and_general_paths_agree():
    rng = np.random.default_rng(3)
    img, _ = _image(rng, (3, 150, 150))
    img = np.nan_to_num(img)
    x, y = rng.uniform(40, 110, 20), rng.uniform(40, 110, 20)
    spec = CutoutSpec(angular_size=16.0, out_size=24)
    fast = make_cutouts(img, None, x, y, 0.262, spec)
    valid = np.ones(img.shape, bool)
    valid[:, 0, 0] = False  # outside every window: still the fast path, same result
    np.testing.assert_array_equal(make_cutouts(img, valid, x, y, 0.262, spec).pixels, fast.pixels)
    img2 = img.copy()
    img2[0, 0, 0] = np.inf  # far away as well
    np.testing.assert_array_equal(make_cutouts(img2, None, x, y, 0.262, spec).pixels, fast.pixels)
    # a NaN inside one source's window forces the general path for that source only
    img3 = img.copy()
    img3[:, int(y[0]), int(x[0])] = np.nan
    got = make_cutouts(img3, None, x, y, 0.262, spec)
    want, masked = reference_cutouts(img3, None, x, y, 0.262, spec)
    np.testing.assert_allclose(got.pixels, want, rtol=2e-6, atol=2e-6)
    assert got.masked_fraction[0] > 0


def test_far_outside_and_empty():
    img = np.ones((3, 50, 50), np.float32)
    spec = CutoutSpec(angular_size=8.0, out_size=8, fill=0.5)
    got = make_cutouts(img, None, [1e6, -500.0], [25.0, 25.0], 0.262, spec)
    assert np.all(got.pixels == 0.5) and np.all(got.masked_fraction == 1.0)
    empty = make_cutouts(img, None, [], [], 0.262, spec)
    assert empty.pixels.shape == (0, 3, 8, 8) and empty.masked_fraction.shape == (0,)


def _cube(name):
    from pathlib import Path

    return fits.getdata(Path(__file__).parent / "data" / "decals_cutouts" / name).astype(np.float32)


@pytest.mark.parametrize("stretch", ["lupton", "asinh", "gz-decals"])
def test_same_galaxy_at_two_pixel_scales_gives_the_same_picture(stretch):
    """example_a (0.1"/px, DR3) and temp_small (0.262"/px, DR5) show one galaxy, centred on CRPIX.

    Measured at the defaults (32", 64 px): correlation 0.9975 / 0.9986 and relative RMS difference
    0.033 / 0.031 (lupton / asinh). Point-sampling the 0.1"/px cube instead of averaging gives
    corr 0.975 and rel. RMS 0.106, a one-output-pixel (0.5") offset corr 0.974 and 0.106: the
    thresholds below separate those from a correct resampling.
    """
    spec = CutoutSpec(stretch=stretch)
    fine = make_cutouts(_cube("example_a.fits"), None, [211.5], [211.5], 0.1, spec).pixels[0].astype(np.float64)
    native = make_cutouts(_cube("temp_small.fits"), None, [112.0], [112.0], 0.262, spec).pixels[0].astype(np.float64)
    corr = np.corrcoef(fine.ravel(), native.ravel())[0, 1]
    rel_rms = np.sqrt(np.mean((fine - native) ** 2) / np.mean(native ** 2))
    assert corr > 0.99, corr
    assert rel_rms < 0.06, rel_rms


def test_lupton_matches_legacypipe_transcription():
    """Stretching the 'none' output with a transcription of legacypipe sdss_rgb gives the lupton output."""
    rng = np.random.default_rng(7)
    img, _ = _image(rng)
    img = np.nan_to_num(img)
    img[:, 40:45, 40:45] = -0.5  # strongly negative: I == 0, black
    x, y = rng.uniform(0, 110, 6), rng.uniform(0, 90, 6)  # partly off the image: 'none' fills with 0
    spec = CutoutSpec(angular_size=16.0, out_size=48)
    raw = make_cutouts(img, None, x, y, 0.262, CutoutSpec(angular_size=16.0, out_size=48, stretch="none")).pixels
    lup = make_cutouts(img, None, x, y, 0.262, spec).pixels
    inside = np.isclose(make_cutouts(img, None, x, y, 0.262, spec).masked_fraction, 0.0)
    for n in range(len(x)):
        want = sdss_rgb(list(raw[n]), ["g", "r", "z"], VIEWER, 0.03, 20).transpose(2, 0, 1)
        covered = np.ones(want.shape, bool) if inside[n] else (raw[n] != 0).all(axis=0)[None].repeat(3, 0)
        np.testing.assert_allclose(lup[n][covered], want[covered], rtol=1e-6, atol=1e-6)
    # plane mapping: z -> R, r -> G, g -> B
    only = np.zeros((3, 40, 40), np.float32)
    only[2] = 1.0  # z only
    rgb = make_cutouts(only, None, [20.0], [20.0], 0.262, CutoutSpec(angular_size=4.0, out_size=4)).pixels[0]
    assert np.all(rgb[0] > 0.9) and np.all(rgb[1] < 0.2) and np.all(rgb[2] < 0.2)


def test_asinh_formula():
    img = np.zeros((3, 30, 30), np.float32)
    img[0], img[1], img[2] = 0.01, 0.2, 5.0
    spec = CutoutSpec(stretch="asinh", angular_size=2.0, out_size=2)
    px = make_cutouts(img, None, [15.0], [15.0], 0.262, spec).pixels[0]
    soft, top = dict(spec.asinh_softening), dict(spec.asinh_max)
    for band, value, plane in [("g", 0.01, 2), ("r", 0.2, 1), ("z", 5.0, 0)]:
        want = min(1.0, math.asinh(value / soft[band]) / math.asinh(top[band] / soft[band]))
        assert abs(px[plane].mean() - want) < 1e-6 and np.ptp(px[plane]) == 0


@pytest.mark.parametrize("stretch", ["lupton", "asinh", "gz-decals"])
def test_uint8_and_float16_match_float32(stretch):
    rng = np.random.default_rng(11)
    img, valid = _image(rng)
    x, y = _positions(rng, *img.shape[1:])
    f32 = make_cutouts(img, valid, x, y, 0.262, CutoutSpec(stretch=stretch, out_size=32)).pixels
    u8 = make_cutouts(img, valid, x, y, 0.262, CutoutSpec(stretch=stretch, out_size=32, dtype="uint8")).pixels
    f16 = make_cutouts(img, valid, x, y, 0.262, CutoutSpec(stretch=stretch, out_size=32, dtype="float16")).pixels
    assert u8.dtype == np.uint8 and f16.dtype == np.float16
    np.testing.assert_array_equal(u8, np.floor(f32.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    assert 0.0 <= f32.min() and f32.max() <= 1.0 and u8.max() > 200


def test_spec_round_trip_through_json():
    spec = CutoutSpec(angular_size=24.0, out_size=96, stretch="asinh", dtype="uint8", fill=0.1,
                      asinh_softening={"g": 0.01, "r": 0.02, "z": 0.03})
    d = json.loads(json.dumps(spec.to_dict()))
    back = CutoutSpec.from_dict(d)
    assert back == spec and hash(back) == hash(spec)
    assert d["band_planes"] == {"g": 2, "r": 1, "z": 0} and d["lupton_scales"] == {"g": 6.0, "r": 3.4, "z": 2.2}
    assert CutoutSpec.from_dict({"orientation": "north-up"}) == CutoutSpec() and d["orientation"] == "north-up"
    # a record from before orientation was recorded: array order, and marked as such
    old = CutoutSpec.from_dict({"angular_size": 32.0, "stretch": "lupton"})
    assert old.orientation == "fits" and not old.orientation_recorded and CutoutSpec().orientation_recorded
    assert CutoutSpec.from_dict(old.to_dict()).orientation == "fits" and old.to_dict()["orientation"] == "fits"
    assert CutoutSpec().out_pixscale == 0.5 and abs(CutoutSpec().step(0.262) - 0.5 / 0.262) < 1e-12


@pytest.mark.parametrize("kwargs,message", [
    ({"angular_size": 0}, "angular_size must be > 0"),
    ({"angular_size": float("nan")}, "angular_size must be a finite number"),
    ({"out_size": 0}, "out_size must be an integer"),
    ({"out_size": 64.0}, "out_size must be an integer"),
    ({"stretch": "log"}, "stretch must be one of"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"stretch": "none", "dtype": "uint8"}, "stretch 'none' gives nanomaggies"),
    ({"fill": 2.0}, "fill must be in [0, 1]"),
    ({"band_planes": {"g": 3}}, "must be 0 (R), 1 (G) or 2 (B)"),
    ({"lupton_scales": {"g": -1.0}}, "lupton_scales['g'] must be finite and > 0"),
    ({"lupton_scales": 5}, "must map band names to numbers"),
    ({"lupton_q": 0.0}, "lupton_q must be > 0"),
    ({"asinh_max": {"r": "big"}}, "asinh_max['r'] must be a number"),
    ({"orientation": "south-up"}, "orientation must be one of"),
    ({"gz_scales": {"z": 0.0}}, "gz_scales['z'] must be finite and > 0"),
    ({"gz_min": 1.0, "gz_max": 1.0}, "gz_max must be > gz_min"),
    ({"gz_desaturate": 1}, "gz_desaturate must be true or false"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(ConfigError, match=None) as e:
        CutoutSpec(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spec_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown CutoutSpec field"):
        CutoutSpec.from_dict({"angular_size": 32.0, "size": 64})


def test_make_cutouts_argument_errors():
    img = np.zeros((3, 20, 20), np.float32)
    spec = CutoutSpec()
    with pytest.raises(ConfigError, match="image has 3 planes but 2 bands"):
        make_cutouts(img, None, [1.0], [1.0], 0.262, spec, bands=("g", "r"))
    with pytest.raises(ConfigError, match="valid mask shape"):
        make_cutouts(img, np.ones((3, 10, 10), bool), [1.0], [1.0], 0.262, spec)
    with pytest.raises(ConfigError, match="not finite"):
        make_cutouts(img, None, [1.0, np.nan], [1.0, 2.0], 0.262, spec)
    with pytest.raises(ConfigError, match="equal length"):
        make_cutouts(img, None, [1.0, 2.0], [1.0], 0.262, spec)
    with pytest.raises(ConfigError, match="pixscale"):
        make_cutouts(img, None, [1.0], [1.0], 0.0, spec)
    with pytest.raises(ConfigError, match="no entry for band"):
        make_cutouts(img, None, [1.0], [1.0], 0.262, spec, bands=("g", "r", "i"))
    with pytest.raises(ConfigError, match="same RGB plane"):
        make_cutouts(img, None, [1.0], [1.0], 0.262, CutoutSpec(band_planes={"g": 0, "r": 0, "z": 1}))
    with pytest.raises(ConfigError, match="bands"):
        make_cutouts(np.zeros((4, 20, 20), np.float32), None, [1.0], [1.0], 0.262, spec, bands=("g", "r", "i", "z"))
    with pytest.raises(ConfigError, match="image must be"):
        make_cutouts(img[0], None, [1.0], [1.0], 0.262, spec)


def test_fewer_bands():
    """Two bands fill their own planes (the viewer mean runs over the bands given); the third stays 0."""
    img = np.full((2, 40, 40), 0.05, np.float32)
    got = make_cutouts(img, None, [20.0], [20.0], 0.262, CutoutSpec(angular_size=4.0, out_size=4), bands=("g", "r"))
    want = sdss_rgb([img[0, :4, :4], img[1, :4, :4]], ["g", "r"], VIEWER, 0.03, 20).transpose(2, 0, 1)
    np.testing.assert_allclose(got.pixels[0], want, rtol=1e-6, atol=1e-6)
    assert np.all(got.pixels[0, 0] == 0.0) and got.pixels[0, 1].min() > 0
    raw = make_cutouts(img[:1], None, [20.0], [20.0], 0.262, CutoutSpec(angular_size=4.0, out_size=4, stretch="none"),
                       bands=("r",))
    assert np.allclose(raw.pixels[0, 0], 0.05) and np.all(raw.pixels[0, 1:] == 0)


def test_block_map_and_window_scan_agree():
    """Many sources use the map of invalid blocks to choose the fast path, few scan their windows."""
    rng = np.random.default_rng(5)
    img, valid = _image(rng, (3, 160, 160))
    img = np.nan_to_num(img)
    valid[:] = True
    valid[0, 70:73, 90:91] = False  # one small hole
    x, y = rng.uniform(40, 120, 30), rng.uniform(40, 120, 30)
    spec = CutoutSpec(angular_size=12.0, out_size=24)  # windows of ~47 px: 30 of them cover more than the image
    together = make_cutouts(img, valid, x, y, 0.262, spec)
    for n in range(0, 30, 7):  # one source at a time: window scan
        alone = make_cutouts(img, valid, x[n:n + 1], y[n:n + 1], 0.262, spec)
        # equal up to the float32 rounding of the fast path (a block map is coarser than a scan)
        np.testing.assert_allclose(alone.pixels[0], together.pixels[n], rtol=1e-6, atol=1e-6)
        assert abs(alone.masked_fraction[0] - together.masked_fraction[n]) < 1e-7
    want, masked = reference_cutouts(img, valid, x, y, 0.262, spec)
    np.testing.assert_allclose(together.pixels, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(together.masked_fraction, masked, atol=1e-6)
    assert 0 < (together.masked_fraction > 0).sum() < 30


def test_cutouts_leave_torch_thread_count_alone():
    """Numba's OpenMP layer shares libgomp with torch; make_cutouts must not change torch's threads."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        img = np.random.default_rng(0).random((3, 200, 200), dtype=np.float32)
        make_cutouts(img, np.ones(img.shape, bool), np.array([100.0]), np.array([100.0]), 0.262, CutoutSpec())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _sky_picture(pxscale, size=256):
    """uint8 (size, size, 3) picture of one sky (an elliptical galaxy, a ring of 12" radius, a marker
    8" north) drawn at ``pxscale`` arcsec/px, north up, as Galaxy10 DECaLS images are."""
    c = (size - 1) / 2
    yy, xx = (np.mgrid[:size, :size] - c) * pxscale  # arcsec; row 0 north -> yy < 0 is north
    galaxy = np.exp(-0.5 * ((xx / 4.0) ** 2 + (yy / 2.5) ** 2))
    ring = np.exp(-0.5 * ((np.hypot(xx, yy) - 12.0) / 1.0) ** 2)
    marker = np.exp(-0.5 * (xx ** 2 + (yy + 8.0) ** 2) / 0.8 ** 2)
    rgb = np.stack([galaxy, 0.6 * ring + 0.3 * galaxy, marker], axis=-1)
    return np.clip(rgb * 250.0 + 0.5, 0, 255).astype(np.uint8)


def test_galaxy10_hdf5_with_mixed_pxscale_is_cut_at_one_angular_size(tmp_path):
    """Galaxy10 DECaLS keeps a per-image ``pxscale``: images of the same sky at 0.262, 0.5 and 0.131
    arcsec/px load as the same 32" picture (measured against the 0.262 one: at most 8 / 2 grey levels
    apart, mean 0.16 / 0.06); resized without it they disagree (67" / 128" / 34" fields: 161-219 levels)."""
    h5py = pytest.importorskip("h5py")
    from galaxalign_batch.model.data import load_dataset
    from galaxalign_batch.vocabulary import load_vocabulary

    scales = np.array([0.262, 0.5, 0.131] * 10)
    with h5py.File(tmp_path / "g10.h5", "w") as f:
        f["images"] = np.stack([_sky_picture(s) for s in scales])
        f["ans"] = np.repeat(np.arange(3), 10).astype(np.uint8)
        f["pxscale"] = scales
    spec = CutoutSpec(angular_size=32.0, out_size=64)
    ds = load_dataset(tmp_path / "g10.h5", load_vocabulary("galaxy10"), spec=spec)
    assert "pxscale (0.131-0.5 arcsec/px)" in ds.description["image_scale"]
    images = ds.split("all").images.astype(np.int16)  # the splits shuffle the rows: compare all with all
    diff = np.abs(images[:, None] - images[None, :])
    assert diff.max() <= 12 and diff.mean() < 1.0, (diff.max(), diff.mean())
    # north stays up: the marker (blue plane) is 8" = 16 px above the centre
    row, col = np.unravel_index(np.argmax(images[:, 2].mean(axis=0)), (64, 64))
    assert abs(row - (31.5 - 16)) <= 1 and abs(col - 31.5) <= 1
    with h5py.File(tmp_path / "no_scale.h5", "w") as f:
        f["images"] = np.stack([_sky_picture(s) for s in scales])
        f["ans"] = np.repeat(np.arange(3), 10).astype(np.uint8)
    old = load_dataset(tmp_path / "no_scale.h5", load_vocabulary("galaxy10"), spec=spec).split("all").images
    assert np.abs(old[1].astype(np.int16) - old[0]).max() > 100


def test_preprocess_benchmark_compares_like_for_like(tmp_path):
    """bench/preprocess.py at a toy size: its baseline must cut the same pictures as the fast path (same
    orientation, stretch and centre), or its speed ratio compares two different products."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "preprocess.py"
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(script), "--bricks", "1", "--size", "800", "--data", str(tmp_path / "data"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["paths"]["baseline"]["cutouts"] == figures["paths"]["fast_1thread"]["cutouts"] > 20
    assert figures["median_corr_fast_vs_baseline"] > 0.95, proc.stdout[-2000:]
    assert "warning" not in proc.stderr
