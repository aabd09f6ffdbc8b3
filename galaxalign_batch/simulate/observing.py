"""Observing conditions of the simulated survey: bands, PSF (Moffat), depth and per-pixel noise.

Numbers (see docs/simulate.md): PSF FWHM g/r/z = 1.35/1.25/1.15 arcsec (Moffat beta 3), 5-sigma
point-source depths g/r/z = 24.7/24.1/23.3 AB, a few tenths of a magnitude deeper than the DECaLS
requirement for an ELG-like galaxy (24.0/23.4/22.5). Fluxes are nanomaggies (AB zero point 22.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.survey.layout import BANDS, PIXSCALE

ZEROPOINT = 22.5
PSF_BETA = 3.0
FWHM = {"g": 1.35, "r": 1.25, "i": 1.20, "z": 1.15}     # arcsec
DEPTH = {"g": 24.7, "r": 24.1, "i": 23.7, "z": 23.3}    # 5-sigma point source, AB mag
KERNEL_SIZE = 41  # px, odd: the PSF kernel for galaxies (99.7% of a 1.35" Moffat's flux)


def check_bands(bands) -> tuple[str, ...]:
    bands = tuple(bands)
    bad = [b for b in bands if b not in FWHM]
    if not bands or bad or len(set(bands)) != len(bands):
        raise ConfigError(f"bands must be distinct names among {sorted(FWHM)}, got {list(bands)}")
    return bands


def mag_to_flux(mag):
    """AB magnitude -> nanomaggies."""
    return 10.0 ** ((ZEROPOINT - np.asarray(mag, dtype=np.float64)) / 2.5)


def flux_to_mag(flux):
    return ZEROPOINT - 2.5 * np.log10(np.asarray(flux, dtype=np.float64))


def moffat(fwhm: float, beta: float = PSF_BETA):
    import galsim

    return galsim.Moffat(beta=beta, fwhm=fwhm)


def psf_kernel(psf, pixscale: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """The PSF sampled at pixel centres on an odd ``size`` grid, centred on the middle pixel.

    ``psf`` is a galsim profile or already a 2-D array (returned as float64). The pixel response is
    not included: the renderer integrates the intrinsic light over pixels before convolving.
    """
    if isinstance(psf, np.ndarray):
        if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[0] != psf.shape[1]:
            raise ConfigError(f"a PSF kernel array must be square with odd size, got shape {psf.shape}")
        return psf.astype(np.float64)
    return psf.drawImage(nx=size, ny=size, scale=pixscale, method="no_pixel").array.astype(np.float64)


def psfnorm(psf, pixscale: float) -> float:
    """``sqrt(sum p^2)`` of the pixelised, unit-sum PSF ``p`` (legacypipe's ``psfnorm``)."""
    img = psf.drawImage(nx=KERNEL_SIZE * 2 + 1, ny=KERNEL_SIZE * 2 + 1, scale=pixscale).array
    p = img / img.sum()
    return float(np.sqrt(np.sum(p * p)))


def pixel_sigma(depth_mag: float, psf, pixscale: float) -> float:
    """Per-pixel sky noise (nanomaggies) giving a 5-sigma point-source depth ``depth_mag`` with this PSF.

    The optimal (PSF-weighted) flux error of a point source is ``sigma_pix / psfnorm``, so
    ``sigma_pix = F5 / 5 * psfnorm`` with ``F5`` the flux of a ``depth_mag`` source.
    """
    return float(mag_to_flux(depth_mag) / 5.0 * psfnorm(psf, pixscale))


@lru_cache(maxsize=256)
def _moffat_kernel(fwhm: float, beta: float, pixscale: float) -> np.ndarray:
    k = psf_kernel(moffat(fwhm, beta), pixscale)
    k.flags.writeable = False
    return k


@lru_cache(maxsize=256)
def _moffat_psfnorm(fwhm: float, beta: float, pixscale: float) -> float:
    return psfnorm(moffat(fwhm, beta), pixscale)


@dataclass
class Conditions:
    """Seeing and depth of one observation (a brick, or one labelled cutout)."""

    bands: tuple[str, ...]
    fwhm: dict[str, float]
    depth: dict[str, float]
    pixscale: float = PIXSCALE
    beta: float = PSF_BETA

    @classmethod
    def nominal(cls, bands=BANDS, pixscale: float = PIXSCALE) -> "Conditions":
        bands = check_bands(bands)
        return cls(bands, {b: FWHM[b] for b in bands}, {b: DEPTH[b] for b in bands}, pixscale)

    @classmethod
    def random(cls, rng: np.random.Generator, bands=BANDS, pixscale: float = PIXSCALE,
               seeing_range=(0.9, 1.15), depth_scatter: float = 0.15) -> "Conditions":
        """Nominal conditions with one seeing factor for all bands (in steps of 0.01, so PSF kernels
        are cached and reused) and a depth scatter per band."""
        bands = check_bands(bands)
        f = round(float(rng.uniform(*seeing_range)), 2)
        return cls(bands, {b: FWHM[b] * f for b in bands},
                   {b: DEPTH[b] + float(rng.normal(0.0, depth_scatter)) for b in bands}, pixscale)

    def psf(self, band: str):
        return moffat(self.fwhm[band], self.beta)

    def kernels(self) -> list[np.ndarray]:
        return [_moffat_kernel(round(self.fwhm[b], 6), self.beta, self.pixscale) for b in self.bands]

    def psfnorms(self) -> np.ndarray:
        return np.array([_moffat_psfnorm(round(self.fwhm[b], 6), self.beta, self.pixscale) for b in self.bands])

    def sigmas(self) -> np.ndarray:
        """Per-pixel noise (nanomaggies) per band at full coverage."""
        return mag_to_flux([self.depth[b] for b in self.bands]) / 5.0 * self.psfnorms()


# ------------------------------------------------------------------------------------- coadd (resampled) noise

LANCZOS_ORDER = 3
COADD_EXPOSURES = 3   # DECaLS DR9: most of the footprint has 2-4 exposures per band


def lanczos_weights(shift, order: int = LANCZOS_ORDER) -> np.ndarray:
    """Normalised Lanczos-``order`` interpolation weights for sub-pixel shifts ``shift`` in [0, 1).

    Returns (..., 2 * order): the weights of input pixels at offsets ``-order + 1 ... order`` from the
    output pixel, for an input grid displaced by ``shift`` px (the output pixel sits ``shift`` px after
    input pixel 0). Each row sums to 1 (flux-preserving, as the Legacy Survey pipeline's resampling).
    """
    d = np.asarray(shift, dtype=np.float64)[..., None]
    k = np.arange(-order + 1, order + 1, dtype=np.float64)
    x = k - d
    w = np.sinc(x) * np.sinc(x / order) * (np.abs(x) < order)
    return w / w.sum(axis=-1, keepdims=True)


def coadd_noise(rng: np.random.Generator, shape, n_exposures: int = COADD_EXPOSURES,
                order: int = LANCZOS_ORDER) -> np.ndarray:
    """Unit-variance noise with the pixel-to-pixel correlation of a resampled coadd.

    Each image of ``shape`` (..., H, W) is the mean of ``n_exposures`` white-noise exposures, each
    resampled onto the output grid with Lanczos-``order`` interpolation at its own random sub-pixel
    shift (uniform in [0, 1) px in x and y), as the Legacy Survey coadds resample each CCD onto the
    brick grid; then divided by its exact standard deviation, so that every pixel has variance 1
    (multiply by the depth's per-pixel sigma). Exposures have equal weight (equal depth); rotations and
    pixel-scale differences between exposures, and source Poisson noise, are left out. Float32.

    The correlation depends on the shifts: a shift of 0 copies the exposure (white), a shift of 0.5 px
    correlates neighbours most. :func:`coadd_noise_correlation` gives the expected value.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"noise shape must be (..., H, W) with positive sizes, got {shape}")
    if isinstance(n_exposures, bool) or not isinstance(n_exposures, (int, np.integer)) or n_exposures < 1:
        raise ConfigError(f"n_exposures must be a positive integer, got {n_exposures!r}")
    *lead, h, w = shape
    m = int(np.prod(lead, dtype=np.int64)) if lead else 1
    taps = 2 * order
    out = np.zeros((m, h, w), np.float32)
    var = np.zeros(m, np.float64)
    for _ in range(n_exposures):
        wy = lanczos_weights(rng.uniform(0.0, 1.0, m), order)          # (m, taps)
        wx = lanczos_weights(rng.uniform(0.0, 1.0, m), order)
        var += (wy ** 2).sum(1) * (wx ** 2).sum(1)
        wy, wx = wy.astype(np.float32), wx.astype(np.float32)
        white = rng.standard_normal((m, h + taps - 1, w + taps - 1), dtype=np.float32)
        rows = sum(wy[:, i, None, None] * white[:, i:i + h, :] for i in range(taps))           # (m, h, w + taps - 1)
        out += sum(wx[:, j, None, None] * rows[:, :, j:j + w] for j in range(taps))
    out /= np.sqrt(var).astype(np.float32)[:, None, None]   # the mean's 1/n cancels: sum / sqrt(sum of variances)
    return out.reshape(shape)


def coadd_noise_correlation(lag=(0, 1), n_exposures: int = COADD_EXPOSURES, order: int = LANCZOS_ORDER,
                            samples: int = 20000, seed: int = 0) -> float:
    """Expected correlation coefficient of :func:`coadd_noise` between pixels ``lag`` = (dy, dx) apart,
    averaged over the random shifts (Monte Carlo over ``samples`` coadds: exact per coadd, from the weights)."""
    rng = np.random.default_rng(seed)
    dy, dx = (abs(int(v)) for v in lag)
    taps = 2 * order

    def auto(wts, lag1):   # sum_i w_i w_{i+lag}
        return (wts[:, : taps - lag1] * wts[:, lag1:]).sum(1) if lag1 < taps else np.zeros(len(wts))

    cov = np.zeros(samples)
    var = np.zeros(samples)
    for _ in range(n_exposures):
        wy = lanczos_weights(rng.uniform(0.0, 1.0, samples), order)
        wx = lanczos_weights(rng.uniform(0.0, 1.0, samples), order)
        cov += auto(wy, dy) * auto(wx, dx)
        var += auto(wy, 0) * auto(wx, 0)
    return float(np.mean(cov / var))
