"""`restore`: the denoising head on whole tiles, in windows, written as FITS cubes (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.wcs import WCS

from galaxalign_batch.cli import main
from galaxalign_batch.restoration import (FoundationEncoder, TrainSettings, denoise, draw_clean, save_head,
                                          train_head)
from galaxalign_batch.restoration.tiles import restore_tile, window_starts
from galaxalign_batch.survey import open_tile

pytestmark = pytest.mark.usefixtures("torch_one_thread")

H, W = 150, 190
SIGMA = np.array([0.004, 0.006, 0.012])  # nanomaggies per pixel, g r z


def _wcs(h, w):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [w / 2, h / 2]
    wcs.wcs.cd = np.array([[-0.262 / 3600, 0], [0, 0.262 / 3600]])
    return wcs


def _field(seed: int):
    """Clean galaxies on an empty (3, H, W) field, and the field with white noise of SIGMA."""
    clean = np.zeros((3, H, W), np.float32)
    stamps = draw_clean(6, stamp_size=40, seed=seed).clean
    for i, s in enumerate(stamps):
        y, x = 15 + 60 * (i // 3), 15 + 55 * (i % 3)
        clean[:, y:y + 40, x:x + 40] += s
    rng = np.random.default_rng(seed)
    noisy = clean + (SIGMA[:, None, None] * rng.normal(size=clean.shape)).astype(np.float32)
    return clean, noisy


def _write_cube(path, data, bands="grz"):
    header = _wcs(*data.shape[1:]).to_header()
    header["BANDS"] = bands
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    from galaxalign_batch.model.train import TrainConfig, build_model

    tmp = tmp_path_factory.mktemp("heads")
    torch.set_num_threads(1)
    trained = train_head(draw_clean(8, stamp_size=48, seed=1),
                         TrainSettings(steps=150, batch_size=4, crop=32, width=16, realisations=2, seed=0)).head
    torch.manual_seed(0)
    enc = FoundationEncoder.from_model(build_model(TrainConfig(data="", out="")), "random weights")
    with_features = train_head(draw_clean(4, stamp_size=48, seed=2),
                               TrainSettings(steps=2, batch_size=2, crop=32, width=8, realisations=1), enc).head
    return {"trained": save_head(trained, tmp / "plain.safetensors"), "trained_head": trained,
            "features": save_head(with_features, tmp / "features.safetensors"), "features_head": with_features}


def test_windows_cover_the_tile_with_cores_at_least_a_margin_inside():
    assert window_starts(100, 128, 16) == [0]
    s = window_starts(1000, 128, 16)
    assert s[0] == 0 and s[-1] == 1000 - 128 and all(b - a <= 96 for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("kind", ["trained", "features"])
def test_restore_tile_equals_the_head_on_each_window(heads, tmp_path, kind):
    clean, noisy = _field(0)
    noisy[:, 100:120, 10:30] = np.nan  # no coverage there
    _write_cube(tmp_path / "cube.fits", noisy)
    tile = open_tile(tmp_path / "cube.fits")
    head = heads[f"{kind}_head"]
    out, info = restore_tile(head, tile, window=64, margin=8, batch_size=5)
    assert out.shape == (3, H, W) and out.dtype == np.float32
    assert np.array_equal(np.isnan(out), ~tile.valid) and np.isnan(out[:, 110, 20]).all()
    assert info["windows"] == len(window_starts(H, 64, 8)) * len(window_starts(W, 64, 8))
    # the noise of a cube (no invvar) is estimated over the tile: close to the truth
    np.testing.assert_allclose(info["sigma_median"], SIGMA, rtol=0.15)
    sig = np.asarray(info["sigma_median"])
    # the second window along each axis (starts at 48) keeps rows/columns 56..104: what the head gives that window
    y0 = x0 = 48
    window = np.where(tile.valid[:, y0:y0 + 64, x0:x0 + 64], tile.image[:, y0:y0 + 64, x0:x0 + 64], 0)[None]
    direct = denoise(head, window, sig[None], pixscale=tile.pixscale)[0]
    np.testing.assert_allclose(out[:, 60:100, 60:100], direct[:, 12:52, 12:52], atol=1e-5)


def test_a_trained_head_restores_a_tile(heads, tmp_path):
    clean, noisy = _field(5)
    _write_cube(tmp_path / "cube.fits", noisy)
    out, _ = restore_tile(heads["trained_head"], open_tile(tmp_path / "cube.fits"), window=64, margin=8)
    err_noisy = np.sqrt(np.mean((noisy - clean) ** 2, axis=(1, 2))) / SIGMA
    err_out = np.sqrt(np.mean((out - clean) ** 2, axis=(1, 2))) / SIGMA
    # a head (width 16, channel norm) trained 150 steps: RMSE / sigma 0.71, 0.82, 0.76 in g, r, z (the noisy field: 1.0;
    # at width 8 the channel-normalised head stays near the input, 0.99-1.00 after 300 steps)
    assert np.allclose(err_noisy, 1.0, atol=0.02) and np.all(err_out < 0.95 * err_noisy), err_out


def test_cli_restore_writes_cubes_skips_done_and_lists_failures(heads, tmp_path, capsys, caplog):
    from conftest import lease_holder

    from galaxalign_batch.model.spec import file_digest

    d = tmp_path / "tiles"
    d.mkdir()
    _write_cube(d / "a.fits", _field(1)[1])
    _write_cube(d / "b.fits", _field(2)[1][:2], bands="gr")  # no z band
    out = tmp_path / "restored"
    argv = ["--no-progress", "restore", "--tiles", str(d), "--model", str(heads["features"]), "--out", str(out),
            "--window", "64", "--margin", "8", "--device", "cpu"]
    assert main(argv) == 3
    text = capsys.readouterr().out
    assert "restored 1 tile(s)" in text and "needs grz (missing z)" in text
    tile = open_tile(out / "a-restored.fits")  # a cube like any other: embed and cutout read it
    assert tile.bands == ("g", "r", "z") and tile.image.shape == (3, H, W)
    xy = np.array([[0.0, 0.0], [W - 1.0, H - 1.0], [17.5, 99.0]])
    np.testing.assert_allclose(tile.wcs.wcs_pix2world(xy, 0), _wcs(H, W).wcs_pix2world(xy, 0), rtol=0, atol=1e-10)
    with fits.open(out / "a-restored.fits") as f:
        assert f[0].header["HEADSHA"] and f[0].header["WINDOW"] == 64
    mtime = (out / "a-restored.fits").stat().st_mtime_ns
    (d / "b.fits").unlink()
    assert main(argv) == 0 and "1 already there" in capsys.readouterr().out
    assert (out / "a-restored.fits").stat().st_mtime_ns == mtime
    assert main(argv + ["--force"]) == 0 and "restored 1 tile(s)" in capsys.readouterr().out
    # another head (a retrained one) or another --margin: the output is not this run's, so it is made again
    mtime = (out / "a-restored.fits").stat().st_mtime_ns
    other = argv[:argv.index("--model") + 1] + [str(heads["trained"])] + argv[argv.index("--model") + 2:]
    assert main(other) == 0
    text = capsys.readouterr().out
    assert "restored 1 tile(s)" in text and "1 of them again: made by another head" in text
    with fits.open(out / "a-restored.fits") as f:
        assert f[0].header["HEADSHA"] == file_digest(heads["trained"])
    assert (out / "a-restored.fits").stat().st_mtime_ns != mtime
    assert main(other) == 0 and "1 already there" in capsys.readouterr().out
    assert main(other[:-4] + ["--margin", "4", "--device", "cpu"]) == 0
    assert "1 of them again" in capsys.readouterr().out
    with lease_holder(out) as holder:  # one restore per folder at a time
        assert main(other + ["--force"]) == 1
        assert f"pid {holder.pid}" in caplog.records[-1].getMessage()
    assert main(["--no-progress", "restore", "--tiles", str(d), "--model", str(d / "a.fits"), "--out",
                 str(out)]) == 1  # not a head file


@pytest.mark.parametrize("kind", ["trained", "features"])
def test_bf16_restores_within_a_small_fraction_of_the_noise(heads, tmp_path, kind):
    """``--precision bf16``: the head (and encoder) under bf16 autocast, the predicted noise subtracted in
    float32; measured with a bench-trained head: RMSE/sigma 0.2467 both ways, median |bf16 - fp32| 0.005 sigma."""
    clean, noisy = _field(3)
    _write_cube(tmp_path / "cube.fits", noisy)
    tile = open_tile(tmp_path / "cube.fits")
    fp32, _ = restore_tile(heads[f"{kind}_head"], tile, window=64, margin=8)
    bf16, _ = restore_tile(heads[f"{kind}_head"], tile, window=64, margin=8, precision="bf16")
    assert bf16.dtype == np.float32 and np.array_equal(np.isnan(bf16), np.isnan(fp32))
    d = np.abs(bf16 - fp32) / SIGMA[:, None, None]
    assert 0 < np.nanmax(d) < 1.0 and np.nanmedian(d) < 0.02, (np.nanmedian(d), np.nanmax(d))  # bf16 did run
    err = [np.sqrt(np.nanmean((x - clean) ** 2, axis=(1, 2))) / SIGMA for x in (fp32, bf16)]
    np.testing.assert_allclose(err[1], err[0], rtol=0.02)


def test_cli_restore_records_its_precision(heads, tmp_path, capsys):
    d = tmp_path / "tiles"
    d.mkdir()
    _write_cube(d / "a.fits", _field(1)[1])
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["--no-progress", "restore", "--tiles", str(d), "--model", str(heads["trained"]), "--out",
                     str(out), "--window", "64", "--margin", "8", "--device", "cpu", "--precision", precision]) == 0
        assert f"({precision})" in capsys.readouterr().out
        assert fits.getheader(out / "a-restored.fits")["PRECISN"] == precision
