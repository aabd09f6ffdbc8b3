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
