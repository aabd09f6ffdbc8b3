"""Restoration metrics per stamp and band: PSNR and SSIM (scikit-image), and the RMS error in units of sigma.

**Data range** (the "peak" of PSNR and the dynamic range of SSIM): per stamp and band, the range of
the *clean* stamp, ``max(clean_b) - min(clean_b)`` (the galaxy's peak surface brightness: the clean
stamps have no sky, so the minimum is ~0). PSNR is ``10 log10(range^2 / MSE)`` over all pixels of
the band; SSIM is Wang et al.'s (Gaussian window sigma 1.5, population covariance). Summaries are
means over stamps and bands of the per-band values (dB for PSNR).
"""

from __future__ import annotations

import numpy as np

from galaxalign_batch.errors import ConfigError


def _check_pair(clean, estimate) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(clean, dtype=np.float64)
    e = np.asarray(estimate, dtype=np.float64)
    if c.shape != e.shape:
        raise ConfigError(f"clean and estimate shapes differ: {c.shape} vs {e.shape}")
    if c.ndim == 3:
        c, e = c[None], e[None]
    if c.ndim != 4:
        raise ConfigError(f"stamps must be (N, bands, H, W) or (bands, H, W), got shape {np.asarray(clean).shape}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(e))):
        raise ConfigError("stamps contain NaN or infinite values")
    return c, e


def data_range(clean) -> np.ndarray:
    """(N, bands) ``max - min`` of each clean band (see the module docstring)."""
    c = np.asarray(clean, dtype=np.float64)
    c = c[None] if c.ndim == 3 else c
    r = c.max(axis=(2, 3)) - c.min(axis=(2, 3))
    if np.any(r <= 0):
        raise ConfigError("a clean band is constant: PSNR / SSIM need a non-zero data range")
    return r


def psnr(clean, estimate) -> np.ndarray:
    """(N, bands) PSNR in dB with the clean stamp's data range (skimage ``peak_signal_noise_ratio``)."""
    from skimage.metrics import peak_signal_noise_ratio

    c, e = _check_pair(clean, estimate)
    rng = data_range(c)
    out = np.empty(c.shape[:2])
    with np.errstate(divide="ignore"):
        for i in range(c.shape[0]):
            for b in range(c.shape[1]):
                out[i, b] = peak_signal_noise_ratio(c[i, b], e[i, b], data_range=rng[i, b])
    return out


def ssim(clean, estimate) -> np.ndarray:
    """(N, bands) SSIM with the clean stamp's data range (skimage ``structural_similarity``)."""
    from skimage.metrics import structural_similarity

    c, e = _check_pair(clean, estimate)
    rng = data_range(c)
    out = np.empty(c.shape[:2])
    for i in range(c.shape[0]):
        for b in range(c.shape[1]):
            out[i, b] = structural_similarity(c[i, b], e[i, b], data_range=rng[i, b], gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False)
    return out


def rmse_sigma(clean, estimate, sigma) -> np.ndarray:
    """(N, bands) RMS error in units of the per-pixel noise ``sigma`` (N, bands): 1 for the noisy input."""
    c, e = _check_pair(clean, estimate)
    s = np.asarray(sigma, dtype=np.float64).reshape(c.shape[0], c.shape[1])
    return np.sqrt(np.mean((e - c) ** 2, axis=(2, 3))) / s


def summary(clean, estimate, sigma=None, with_ssim: bool = True) -> dict:
    """Mean (and per-band mean) PSNR, SSIM and RMSE/sigma over the stamps."""
    p = psnr(clean, estimate)
    out = {"psnr": float(p.mean()), "psnr_per_band": [float(v) for v in p.mean(axis=0)],
           "psnr_std": float(p.mean(axis=1).std())}
    if with_ssim:
        s = ssim(clean, estimate)
        out.update(ssim=float(s.mean()), ssim_per_band=[float(v) for v in s.mean(axis=0)])
    if sigma is not None:
        r = rmse_sigma(clean, estimate, sigma)
        out.update(rmse_sigma=float(r.mean()), rmse_sigma_per_band=[float(v) for v in r.mean(axis=0)])
    return out
