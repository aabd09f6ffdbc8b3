"""Classical denoisers from scikit-image, on the same noise-normalised stamps as the head.

Every baseline works on ``z = noisy / sigma`` per band (unit noise in every band, as the head's
input) and returns ``estimate_z * sigma`` in nanomaggies. ``sigma`` is the per-pixel noise, known
(from the inverse variance, or the simulation) unless ``sigma_mode="estimated"``, in which case
scikit-image's ``estimate_sigma`` of the normalised stamp is passed instead (NLM, wavelet).

- ``nlm``: ``skimage.restoration.denoise_nl_means`` on the three normalised bands jointly
  (``channel_axis``), patch 5 x 5, search distance 6, ``fast_mode``, with the noise sigma given (the
  weights subtract the expected patch distance, scikit-image's "more robust" mode); ``h = h_factor x
  sigma`` is tuned (:func:`tune`).
- ``gaussian``: ``skimage.filters.gaussian`` per band with a tuned width ``sigma_px``.
- ``wavelet``: ``skimage.restoration.denoise_wavelet``, BayesShrink soft thresholds (``db2``,
  sigma given), no parameter to tune.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.restoration.head import check_sigma, check_stamps

NLM_H_GRID = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
GAUSSIAN_GRID = (0.5, 0.75, 1.0, 1.5, 2.0)
SIGMA_MODES = ("known", "estimated")


def _prepare(noisy, sigma) -> tuple[np.ndarray, np.ndarray]:
    a = check_stamps(noisy, None)
    return a, check_sigma(sigma, len(a), a.shape[1])


def _unit_sigma(z: np.ndarray, mode: str) -> float:
    if mode not in SIGMA_MODES:
        raise ConfigError(f"sigma_mode must be one of {SIGMA_MODES}, got {mode!r}")
    if mode == "known":
        return 1.0
    from skimage.restoration import estimate_sigma

    return float(np.mean(estimate_sigma(z, channel_axis=0)))


def nlm(noisy, sigma, h_factor: float = 0.8, *, sigma_mode: str = "known", patch_size: int = 5,
        patch_distance: int = 6) -> np.ndarray:
    """Non-local means (see the module docstring); (N, bands, H, W) nanomaggies."""
    from skimage.restoration import denoise_nl_means

    if not h_factor > 0:
        raise ConfigError(f"h_factor must be > 0, got {h_factor}")
    x, s = _prepare(noisy, sigma)
    out = np.empty_like(x)
    for i in range(len(x)):
        z = x[i].astype(np.float64) / s[i][:, None, None]
        unit = _unit_sigma(z, sigma_mode)
        est = denoise_nl_means(z, h=h_factor * unit, sigma=unit, patch_size=patch_size, patch_distance=patch_distance,
                               fast_mode=True, channel_axis=0)
        out[i] = est * s[i][:, None, None]
    return out


def gaussian(noisy, sigma, sigma_px: float = 1.0) -> np.ndarray:
    """A Gaussian filter of ``sigma_px`` pixels per band; (N, bands, H, W) nanomaggies."""
    from skimage.filters import gaussian as skgauss

    if not sigma_px > 0:
        raise ConfigError(f"sigma_px must be > 0, got {sigma_px}")
    x, _ = _prepare(noisy, sigma)
    return np.stack([skgauss(stamp, sigma=(0, sigma_px, sigma_px), mode="reflect", preserve_range=True)
                     for stamp in x]).astype(np.float32)


def wavelet(noisy, sigma, *, sigma_mode: str = "known", wavelet_name: str = "db2") -> np.ndarray:
    """BayesShrink wavelet denoising per band; (N, bands, H, W) nanomaggies."""
    from skimage.restoration import denoise_wavelet

    x, s = _prepare(noisy, sigma)
    out = np.empty_like(x)
    for i in range(len(x)):
        z = x[i].astype(np.float64) / s[i][:, None, None]
        unit = _unit_sigma(z, sigma_mode)
        est = denoise_wavelet(z, sigma=unit, wavelet=wavelet_name, mode="soft", method="BayesShrink",
                              channel_axis=0, convert2ycbcr=False, rescale_sigma=True)
        out[i] = est * s[i][:, None, None]
    return out


def tune(method: Callable[..., np.ndarray], name: str, grid, noisy, clean, sigma, **kw) -> tuple[float, dict]:
    """The value of parameter ``name`` in ``grid`` giving the best mean PSNR of ``method`` on (noisy, clean);
    returns (best value, {value: mean PSNR})."""
    from galaxalign_batch.restoration.metrics import psnr

    if not len(grid):
        raise ConfigError("empty tuning grid")
    scores = {float(v): float(psnr(clean, method(noisy, sigma, **{name: v}, **kw)).mean()) for v in grid}
    best = max(scores, key=scores.get)
    return best, scores
