"""Simulated noisy / clean pairs at Legacy Survey noise levels.

A *clean* stamp is one simulated galaxy (``simulate.draw_galaxy``, a random Galaxy10 class, r in the
simulator's 15.5-19 range) convolved with its Moffat PSF, without noise: (bands, S, S) float32
nanomaggies at 0.262"/px, centred within half a pixel. Its *nominal* per-pixel noise
``sigma_nominal`` follows the simulator (``Conditions.sigmas``): ``sigma = F5 / 5 * psfnorm`` for the
5-sigma point-source depth ``F5`` (g/r/z = 24.7/24.1/23.3 AB) with that stamp's PSF. A noise level is
a depth offset per band (mag; positive = deeper): ``sigma = sigma_nominal * 10**(-0.4 * offset)``.
Noise is Gaussian (no source Poisson noise) and either white, as in the simulated survey
(``noise="white"``, the default), or ``"correlated"``: the pixel-correlated noise of a resampled coadd
(``simulate.observing.coadd_noise``: ``n_exposures`` white-noise exposures, each resampled with
Lanczos-3 at a random sub-pixel shift, averaged), scaled to the same per-pixel sigma. Its neighbour
correlation coefficient is ~0.115 for 3 exposures (:func:`pixel_correlation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.progress import bar
from galaxalign_batch.simulate.galaxies import MAG_RANGE, class_keys, draw_galaxy
from galaxalign_batch.simulate.observing import COADD_EXPOSURES, DEPTH, Conditions, check_bands, coadd_noise
from galaxalign_batch.survey.layout import BANDS, PIXSCALE

DEFAULT_STAMP = 128   # px: holds the default CutoutSpec's 32" footprint (122 px at 0.262"/px)

# DECaLS requirement for an ELG-like source (legacysurvey.org/decamls), the depths the issue calls
# "Legacy Survey" depths; the simulator's nominal depths are a few tenths deeper.
DECALS_REQUIREMENT = {"g": 24.0, "r": 23.4, "z": 22.5}

# Named noise levels: depth offsets per band relative to the simulator's nominal depth (mag, + = deeper).
LEVELS: dict[str, dict[str, float]] = {
    "shallow": {b: -1.0 for b in BANDS},
    "decals-requirement": {b: round(DECALS_REQUIREMENT[b] - DEPTH[b], 3) for b in BANDS},
    "nominal": {b: 0.0 for b in BANDS},
    "deep": {b: 1.0 for b in BANDS},
}


NOISE_MODELS = ("white", "correlated")


def check_noise(noise: str, n_exposures: int = COADD_EXPOSURES) -> str:
    if noise not in NOISE_MODELS:
        raise ConfigError(f"unknown noise model {noise!r}; known: {', '.join(NOISE_MODELS)}")
    if isinstance(n_exposures, bool) or not isinstance(n_exposures, (int, np.integer)) or n_exposures < 1:
        raise ConfigError(f"n_exposures must be a positive integer, got {n_exposures!r}")
    return noise


def unit_noise(rng: np.random.Generator, shape, noise: str = "white", n_exposures: int = COADD_EXPOSURES) -> np.ndarray:
    """Float32 noise of ``shape`` (..., H, W) with unit per-pixel variance: white, or a resampled coadd's
    (see the module docstring)."""
    check_noise(noise, n_exposures)
    if noise == "white":
        return rng.standard_normal(shape, dtype=np.float32)
    return coadd_noise(rng, shape, n_exposures)


def pixel_correlation(noise, lag=(0, 1)) -> float:
    """Correlation coefficient of ``noise`` (..., H, W) between pixels ``lag`` = (dy, dx) apart (pooled over
    all leading axes; zero-mean noise assumed, as for pure noise fields)."""
    a = np.asarray(noise, dtype=np.float64)
    dy, dx = (int(v) for v in lag)
    if dy < 0 or dx < 0 or a.ndim < 2 or dy >= a.shape[-2] or dx >= a.shape[-1]:
        raise ConfigError(f"lag must be (dy, dx) >= 0 and smaller than the image, got {lag}")
    h, w = a.shape[-2:]
    x, y = a[..., : h - dy, : w - dx], a[..., dy:, dx:]
    return float((x * y).mean() / np.sqrt((x * x).mean() * (y * y).mean()))


@dataclass
class CleanSet:
    """Noiseless stamps and what is needed to add noise at any depth."""

    clean: np.ndarray           # (N, bands, S, S) float32 nanomaggies
    sigma_nominal: np.ndarray   # (N, bands) float64 nanomaggies per pixel at the nominal depth
    label: np.ndarray           # (N,) int64 Galaxy10 index
    mag_r: np.ndarray           # (N,) float32
    psf_fwhm: np.ndarray        # (N, bands) float32 arcsec
    bands: tuple[str, ...] = BANDS
    pixscale: float = PIXSCALE

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, index) -> "CleanSet":
        return CleanSet(self.clean[index], self.sigma_nominal[index], self.label[index], self.mag_r[index],
                        self.psf_fwhm[index], self.bands, self.pixscale)


@dataclass
class Pairs:
    """Noisy / clean pairs: ``noisy = clean + sigma * N(0, 1)`` per band."""

    noisy: np.ndarray   # (N, bands, S, S) float32 nanomaggies
    clean: np.ndarray   # (N, bands, S, S) float32 nanomaggies
    sigma: np.ndarray   # (N, bands) float64 nanomaggies per pixel
    depth: np.ndarray   # (N, bands) float64 5-sigma point-source depth, AB mag (of white noise of this sigma)
    bands: tuple[str, ...] = BANDS
    noise: str = "white"   # the noise model (NOISE_MODELS)

    def __len__(self) -> int:
        return len(self.noisy)


def draw_clean(n: int, *, stamp_size: int = DEFAULT_STAMP, seed: int = 0, bands=BANDS,
               mag_range: tuple[float, float] = MAG_RANGE, seeing_range=(0.90, 1.15)) -> CleanSet:
    """``n`` noiseless galaxies (classes in turn, ``i % 10``), each with its own seeing.

    Stamp ``i`` comes from seed ``(seed, i)``: the same seed gives the same stamps.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"the number of stamps must be a positive integer, got {n!r}")
    if isinstance(stamp_size, bool) or not isinstance(stamp_size, (int, np.integer)) or not 16 <= stamp_size <= 512:
        raise ConfigError(f"stamp_size must be an integer from 16 to 512 px, got {stamp_size!r}")
    lo, hi = (float(m) for m in mag_range)
    if not lo <= hi:
        raise ConfigError(f"mag_range must be (bright, faint), got {mag_range!r}")
    bands = check_bands(bands)
    keys = class_keys()
    nb = len(bands)
    clean = np.empty((n, nb, stamp_size, stamp_size), np.float32)
    sigma = np.empty((n, nb), np.float64)
    label = np.empty(n, np.int64)
    mag = np.empty(n, np.float32)
    fwhm = np.empty((n, nb), np.float32)
    with bar(total=n, desc="clean stamps", unit="img") as pbar:
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7, i]))
            cond = Conditions.random(rng, bands, seeing_range=seeing_range, depth_scatter=0.0)
            cls = i % len(keys)
            img, truth = draw_galaxy(keys[cls], rng, stamp_size=stamp_size, psf=cond, bands=bands,
                                     mag_r=float(rng.uniform(lo, hi)), offset=tuple(rng.uniform(-0.5, 0.5, 2)))
            clean[i], sigma[i], label[i], mag[i] = img, cond.sigmas(), cls, truth["mag_r"]
            fwhm[i] = [cond.fwhm[b] for b in bands]
            pbar.update(1)
    return CleanSet(clean, sigma, label, mag, fwhm, bands)


def level_offsets(level, bands=BANDS) -> np.ndarray:
    """Depth offsets (bands,) in mag of a named level (:data:`LEVELS`), a number, or a {band: offset} dict."""
    if isinstance(level, str):
        if level not in LEVELS:
            raise ConfigError(f"unknown noise level {level!r}; known: {', '.join(LEVELS)}")
        level = LEVELS[level]
    if isinstance(level, dict):
        missing = [b for b in bands if b not in level]
        if missing:
            raise ConfigError(f"noise level has no depth offset for band(s) {missing}")
        return np.array([float(level[b]) for b in bands])
    off = np.asarray(level, dtype=np.float64)
    if off.ndim == 0:
        return np.full(len(bands), float(off))
    if off.shape != (len(bands),):
        raise ConfigError(f"depth offsets must be a number or one per band ({len(bands)}), got shape {off.shape}")
    return off


def add_noise(clean: CleanSet, offsets, rng: np.random.Generator, noise: str = "white",
              n_exposures: int = COADD_EXPOSURES) -> Pairs:
    """Pairs at depth ``nominal + offsets``: ``offsets`` is a level for all stamps (see :func:`level_offsets`)
    or an (N, bands) array of per-stamp offsets (mag, + = deeper). ``noise``: ``"white"`` or
    ``"correlated"`` (a resampled coadd of ``n_exposures``), the same per-pixel sigma either way."""
    check_noise(noise, n_exposures)
    off = np.asarray(offsets, dtype=np.float64) if not isinstance(offsets, (str, dict)) else None
    if off is not None and off.ndim == 2:
        if off.shape != clean.sigma_nominal.shape:
            raise ConfigError(f"per-stamp depth offsets must be {clean.sigma_nominal.shape}, got {off.shape}")
    else:
        off = np.broadcast_to(level_offsets(offsets, clean.bands), clean.sigma_nominal.shape)
    if not np.all(np.isfinite(off)):
        raise ConfigError("depth offsets must be finite")
    sigma = clean.sigma_nominal * 10.0 ** (-0.4 * off)
    field = unit_noise(rng, clean.clean.shape, noise, n_exposures) * sigma.astype(np.float32)[:, :, None, None]
    depth = np.array([DEPTH[b] for b in clean.bands])[None, :] + off
    return Pairs(clean.clean + field, clean.clean, sigma, depth, clean.bands, noise)


def make_pairs(n: int, level="nominal", *, stamp_size: int = DEFAULT_STAMP, seed: int = 0,
               noise: str = "white") -> Pairs:
    """``n`` noisy / clean pairs at one noise level (:func:`draw_clean` + :func:`add_noise`)."""
    check_noise(noise)
    clean = draw_clean(n, stamp_size=stamp_size, seed=seed)
    return add_noise(clean, level, np.random.default_rng(np.random.SeedSequence([seed, 11])), noise)
