"""Image restoration: simulated pairs, metrics, the denoising head, classical baselines, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.restoration import (LEVELS, DenoiseHead, FoundationEncoder, HeadConfig, TrainSettings,
                                          add_noise, baselines, denoise, draw_clean, load_head, metrics,
                                          read_head_info, save_head, train_head)


@pytest.fixture(scope="module")
def clean():
    return draw_clean(6, stamp_size=40, seed=3)


@pytest.fixture(scope="module")
def encoder():
    from galaxalign_batch.model.train import TrainConfig, build_model

    torch.manual_seed(0)
    return FoundationEncoder.from_model(build_model(TrainConfig(data="", out="")), "random weights")


def test_pairs_have_the_stated_noise_level(clean):
    assert clean.clean.shape == (6, 3, 40, 40) and clean.clean.dtype == np.float32
    assert np.all((clean.sigma_nominal > 0.001) & (clean.sigma_nominal < 0.03))
    nominal = add_noise(clean, "nominal", np.random.default_rng(0))
    deep = add_noise(clean, "deep", np.random.default_rng(1))
    for pairs in (nominal, deep):
        measured = (pairs.noisy - pairs.clean).std(axis=(0, 2, 3)) / pairs.sigma.mean(axis=0)
        np.testing.assert_allclose(measured, 1.0, atol=0.03)   # 9600 pixels per band: ~0.7 % scatter
    np.testing.assert_allclose(deep.sigma, nominal.sigma * 10 ** -0.4, rtol=1e-12)
    np.testing.assert_allclose(nominal.depth[0], [24.7, 24.1, 23.3])
    np.testing.assert_allclose(add_noise(clean, "decals-requirement", np.random.default_rng(2)).depth[0],
                               [24.0, 23.4, 22.5])
    assert set(LEVELS) >= {"shallow", "nominal", "deep"}


def test_correlated_noise_has_the_depth_sigma_and_a_coadd_correlation(clean):
    from galaxalign_batch.restoration.pairs import pixel_correlation, unit_noise
    from galaxalign_batch.simulate.observing import coadd_noise_correlation, lanczos_weights

    np.testing.assert_allclose(lanczos_weights([0.0, 0.3, 0.5]).sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lanczos_weights(0.0), [0, 0, 1, 0, 0, 0], atol=1e-12)   # no shift: a copy
    field = unit_noise(np.random.default_rng(0), (64, 3, 64, 64), "correlated")       # 786 k pixels
    assert field.dtype == np.float32 and field.shape == (64, 3, 64, 64)
    assert abs(field.std() - 1.0) < 0.01 and abs(field.mean()) < 0.01
    expected = coadd_noise_correlation((0, 1))
    assert 0.10 < expected < 0.13                                  # Lanczos-3, 3 exposures, random shifts
    for lag in ((0, 1), (1, 0)):
        assert abs(pixel_correlation(field, lag) - expected) < 0.015
    assert abs(pixel_correlation(field, (0, 2)) - coadd_noise_correlation((0, 2))) < 0.015   # negative lobe
    white = unit_noise(np.random.default_rng(0), (64, 3, 64, 64), "white")
    assert abs(pixel_correlation(white, (0, 1))) < 0.01
    pairs = add_noise(clean, "nominal", np.random.default_rng(5), noise="correlated")
    unit = (pairs.noisy - pairs.clean) / pairs.sigma[:, :, None, None]
    assert pairs.noise == "correlated" and abs(unit.std() - 1.0) < 0.05
    white_pairs = add_noise(clean, "nominal", np.random.default_rng(5))
    assert white_pairs.noise == "white"
    np.testing.assert_array_equal(white_pairs.noisy, add_noise(clean, "nominal", np.random.default_rng(5)).noisy)
    with pytest.raises(ConfigError, match="unknown noise model"):
        add_noise(clean, "nominal", np.random.default_rng(0), noise="pink")
    with pytest.raises(ConfigError, match="n_exposures"):
        TrainSettings(noise="correlated", n_exposures=0)


def test_psnr_ssim_rmse_on_known_arrays():
    clean = np.zeros((1, 1, 16, 16))
    clean[0, 0, 8, 8] = 2.0                                   # data range 2
    est = clean + 0.1                                         # MSE 0.01
    assert metrics.psnr(clean, est)[0, 0] == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-9)
    assert metrics.ssim(clean, clean)[0, 0] == pytest.approx(1.0)
    assert metrics.ssim(clean, est)[0, 0] < 1.0
    assert metrics.rmse_sigma(clean, est, [[0.05]])[0, 0] == pytest.approx(2.0)
    s = metrics.summary(clean, est, [[0.05]])
    assert s["psnr"] == pytest.approx(26.0206, abs=1e-4) and s["rmse_sigma"] == pytest.approx(2.0)


def test_nlm_improves_psnr_on_a_noisy_blob():
    yy, xx = np.mgrid[:48, :48]
    blob = 0.5 + 5.0 * np.exp(-((xx - 23.5) ** 2 + (yy - 20.0) ** 2) / (2 * 4.0 ** 2))
    clean = np.stack([blob, 0.8 * blob, 1.2 * blob])[None].astype(np.float32)
    noisy = clean + 0.3 * np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    before = metrics.psnr(clean, noisy).mean()
    after = metrics.psnr(clean, baselines.nlm(noisy, 0.3, 1.0)).mean()
    assert after > before + 5.0
    assert metrics.psnr(clean, baselines.gaussian(noisy, 0.3, 1.0)).mean() > before
    assert metrics.psnr(clean, baselines.wavelet(noisy, 0.3)).mean() > before
    best, scores = baselines.tune(baselines.nlm, "h_factor", (0.5, 1.0), noisy, clean, np.full((1, 3), 0.3))
    assert best in (0.5, 1.0) and scores[best] == max(scores.values())


def test_head_trains_and_lowers_the_loss(clean, torch_one_thread):
    # the default width 16: a channel-normalised head of width 8 learns slowly (measured on 6 stamps of 40 px: RMSE/sigma
    # 1.25 after 40 steps, 1.01 after 150; without the normalisation 0.98 after 40), 7 s on one core
    r = train_head(clean, TrainSettings(steps=150, batch_size=4, crop=32, width=16, realisations=2, seed=0))
    assert r.head.config.norm == "channel"
    first, last = np.mean(r.losses[:5]), np.mean(r.losses[-5:])
    assert last < 0.2 * first, (first, last)
    pairs = add_noise(clean, "nominal", np.random.default_rng(4))
    out = denoise(r.head, pairs.noisy, pairs.sigma, batch_size=4)
    assert out.shape == pairs.noisy.shape and out.dtype == np.float32
    assert metrics.rmse_sigma(pairs.clean, out, pairs.sigma).mean() < 1.0   # better than the noisy input


def test_best_weights_are_put_back_when_a_run_diverges(torch_one_thread):
    """A run that collapses (one head in five at 7200 steps sat at the no-op's loss 1.0 from step ~600) keeps the
    weights of its best window; a run that ends near its best keeps its last weights; the frozen encoder is never
    touched."""
    from galaxalign_batch.restoration.train import BestWeights

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Linear(3, 3)
            self.encoder = torch.nn.Linear(2, 2)

    head = Head()
    watch = BestWeights(head, window=10, factor=2.0)
    losses = []
    for k in range(60):                      # learns: 1.0 -> 0.05 by step 30
        losses.append(max(0.05, 1.0 - k / 30))
        watch.update(losses)
        if k == 29:
            good = head.conv.weight.detach().clone()
    with torch.no_grad():
        head.conv.weight.add_(5.0)           # then the weights blow up ...
        head.encoder.weight.add_(1.0)        # (the encoder is frozen: not the watch's to restore)
    encoder_after = head.encoder.weight.detach().clone()
    for _ in range(40):
        losses.append(0.998)                 # ... and the loss sits at the no-op's
        watch.update(losses)
    assert watch.finish(losses) == 40        # the first window at the plateau (steps 31-40: mean 0.05)
    assert torch.equal(head.conv.weight, good) and torch.equal(head.encoder.weight, encoder_after)

    steady = BestWeights(head, window=10)
    losses = [1.0 / (k + 1) for k in range(100)]
    for k in range(100):
        steady.update(losses[:k + 1])
    last = head.conv.weight.detach().clone()
    assert steady.finish(losses) is None and torch.equal(head.conv.weight, last)


def test_save_load_round_trip_with_features(clean, encoder, tmp_path, torch_one_thread):
    r = train_head(clean, TrainSettings(steps=3, batch_size=2, crop=32, width=8, realisations=1,
                                        noise="correlated"), encoder)
    assert r.head.uses_features and r.head.encoder is encoder
    pairs = add_noise(clean, "shallow", np.random.default_rng(5))
    before = denoise(r.head, pairs.noisy[:3], pairs.sigma[:3])
    path = save_head(r.head, tmp_path / "head.safetensors")
    loaded = load_head(path)
    assert loaded.config == r.head.config and loaded.uses_features
    assert loaded.encoder.weights_digest() == encoder.weights_digest()
    # the file says how the head was trained: which noise model, how many steps
    assert read_head_info(path)["training"]["noise"] == "correlated" == loaded.training_settings["noise"]
    assert loaded.training_settings["steps"] == 3
    np.testing.assert_array_equal(denoise(loaded, pairs.noisy[:3], pairs.sigma[:3]), before)
    # without sigma the noise is estimated from the stamps
    assert np.isfinite(denoise(loaded, pairs.noisy[:2])).all()


def test_a_head_saved_before_the_normalisation_loads_as_it_was(clean, tmp_path, torch_one_thread):
    """Heads saved before 2026-12-06 have no ``norm`` in their configuration: they load without the normalisation
    (their weights have no norm layers) and restore exactly as before; a bad ``norm`` is a clear error."""
    from galaxalign_batch.model.files import read_weights, write_weights
    from galaxalign_batch.restoration.head import META_KEY, ChannelNorm

    r = train_head(clean, TrainSettings(steps=3, batch_size=2, crop=32, width=8, realisations=1, norm="none"))
    path = save_head(r.head, tmp_path / "old.safetensors")
    info = read_head_info(path)
    del info["config"]["norm"]                       # what a file of the earlier code holds
    write_weights(path, read_weights(path), META_KEY, info)
    pairs = add_noise(clean, "nominal", np.random.default_rng(6))
    loaded = load_head(path)
    assert loaded.config.norm == "none" and not any(isinstance(m, ChannelNorm) for m in loaded.modules())
    np.testing.assert_array_equal(denoise(loaded, pairs.noisy[:2], pairs.sigma[:2]),
                                  denoise(r.head, pairs.noisy[:2], pairs.sigma[:2]))
    new = train_head(clean, TrainSettings(steps=2, batch_size=2, crop=32, width=8, realisations=1)).head
    loaded = load_head(save_head(new, tmp_path / "new.safetensors"))
    assert loaded.config.norm == "channel" and sum(isinstance(m, ChannelNorm) for m in loaded.modules()) == 14
    with pytest.raises(ConfigError, match="norm must be one of channel, none"):
        HeadConfig(norm="batch")


def test_bad_input_gives_clear_errors(clean, tmp_path):
    head = DenoiseHead(HeadConfig(width=4))
    good = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(ConfigError, match="add a leading axis"):
        denoise(head, good[0], 0.01)
    with pytest.raises(ConfigError, match="4 band"):
        denoise(head, np.zeros((2, 4, 16, 16), np.float32), 0.01)
    with pytest.raises(ConfigError, match="NaN"):
        denoise(head, np.full((1, 3, 16, 16), np.nan, np.float32), 0.01)
    with pytest.raises(ConfigError, match="sigma"):
        denoise(head, good, -1.0)
    with pytest.raises(ConfigError, match="sigma must be"):
        denoise(head, good, np.ones((5, 3)))
    with pytest.raises(ConfigError, match="shapes differ"):
        metrics.psnr(np.ones((1, 3, 8, 8)), np.ones((1, 3, 8, 9)))
    with pytest.raises(ConfigError, match="constant"):
        metrics.psnr(np.ones((1, 3, 8, 8)), np.ones((1, 3, 8, 8)))
    with pytest.raises(ConfigError, match="unknown noise level"):
        add_noise(clean, "ultra-deep", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="needs the encoder"):
        DenoiseHead(HeadConfig(feature_dim=128))
    with pytest.raises(ConfigError, match="not found"):
        load_head(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="junk.safetensors"):
        load_head(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="positive integer"):
        draw_clean(0)
