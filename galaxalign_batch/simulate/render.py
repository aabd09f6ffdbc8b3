"""Rendering of a galaxy model (galsim profiles + numpy light fields) into a PSF-convolved multi-band stamp.

A model is a set of *systems* (a galaxy, or each galaxy of a merger): a centre (arcsec, relative to
the stamp's source position) and a 2x2 Jacobian from the system's own frame (face-on disk frame)
to the sky plane. Each *component* of a system is a galsim profile or a numpy intensity field in
that frame, has an r-band flux and belongs to a colour *group* (bulge, disk, arms, ...). The
intrinsic light of each group is drawn once, 2x oversampled and integrated over pixels; each band
is then the colour-weighted sum of the groups convolved with that band's PSF. This costs one
real-space draw per component instead of one FFT per component and band.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from galaxalign_batch.simulate.fields import Blobs

OVERSAMPLE = 2
Field = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class System:
    jac: np.ndarray                  # (2, 2): own frame -> sky plane
    center: tuple[float, float]      # arcsec offset from the stamp's source position


@dataclass
class Component:
    colour_group: str
    flux_r: float                    # nanomaggies in r
    profile: object                  # galsim.GSObject of unit flux, a Field or Blobs (normalised to flux_r)
    system: int = 0


@dataclass
class Model:
    systems: list[System] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    colours: dict[str, tuple[float, float]] = field(default_factory=dict)  # group -> (g-r, r-z)

    def add_system(self, jac: np.ndarray, center=(0.0, 0.0)) -> int:
        self.systems.append(System(np.asarray(jac, dtype=np.float64), (float(center[0]), float(center[1]))))
        return len(self.systems) - 1

    def add(self, group: str, flux_r: float, profile, system: int = 0) -> None:
        if flux_r > 0:
            self.components.append(Component(group, float(flux_r), profile, system))

    def band_factor(self, group: str, band: str) -> float:
        """Flux in ``band`` per unit r-band flux of ``group`` (from its g-r, r-z colours)."""
        gr, rz = self.colours[group]
        dm = {"g": gr, "r": 0.0, "i": -0.5 * rz, "z": -rz}[band]
        return float(10.0 ** (-0.4 * dm))

    def total_flux(self, band: str) -> float:
        return sum(c.flux_r * self.band_factor(c.colour_group, band) for c in self.components)


def rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def squash(q: float) -> np.ndarray:
    """Area-preserving stretch with axis ratio ``q`` (minor axis along y), as galsim's Shear(q, beta=0)."""
    return np.array([[1.0 / np.sqrt(q), 0.0], [0.0, np.sqrt(q)]])


def _grid(size: int, scale: float, offset: tuple[float, float]):
    """Sky-plane coordinates (arcsec) of the pixel centres relative to the source."""
    ax = (np.arange(size) - (size - 1) / 2.0) * scale
    return np.meshgrid(ax - offset[0] * scale, ax - offset[1] * scale)  # (xx, yy), rows = y


def bin_pixels(a: np.ndarray) -> np.ndarray:
    """Sum OVERSAMPLE x OVERSAMPLE blocks: the pixel integral of the oversampled image."""
    out = a[0::OVERSAMPLE, 0::OVERSAMPLE].copy()
    for j in range(OVERSAMPLE):
        for i in range(OVERSAMPLE):
            if i or j:
                out += a[j::OVERSAMPLE, i::OVERSAMPLE]
    return out


def _splat(b: Blobs, sysm: System, size: int, scale: float, offset) -> np.ndarray:
    """Round Gaussians at the blobs' sky positions, sampled at pixel centres within 4 sigma."""
    img = np.zeros((size, size), dtype=np.float64)
    sky = b.points @ sysm.jac.T + np.asarray(sysm.center)
    c = (size - 1) / 2.0
    jx = sky[:, 0] / scale + offset[0] + c
    jy = sky[:, 1] / scale + offset[1] + c
    for x, y, w, sig in zip(jx, jy, b.weights, b.sigmas):
        rad = 4.0 * sig / scale
        x0, x1 = max(int(x - rad), 0), min(int(x + rad) + 2, size)
        y0, y1 = max(int(y - rad), 0), min(int(y + rad) + 2, size)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.exp(-0.5 * ((np.arange(x0, x1) - x) * (scale / sig)) ** 2)
        gy = np.exp(-0.5 * ((np.arange(y0, y1) - y) * (scale / sig)) ** 2)
        img[y0:y1, x0:x1] += (w / (sig * sig)) * np.outer(gy, gx)
    return img


def render_groups(model: Model, size: int, scale: float, offset=(0.0, 0.0)) -> dict[str, np.ndarray]:
    """Pixel-integrated intrinsic image (size x size, r-band nanomaggies) of each colour group.

    galsim profiles (with cuspy centres) are drawn OVERSAMPLE x finer and binned; the smooth numpy
    fields and clumps (wider than a pixel, and convolved with a ~4.5-px PSF afterwards) are sampled
    at pixel centres. Each field is normalised to its component's flux over the stamp.
    """
    import galsim

    n = size * OVERSAMPLE
    canvas = galsim.ImageD(n, n, scale=scale / OVERSAMPLE)
    fine: dict[str, np.ndarray] = {}
    coarse: dict[str, np.ndarray] = {}
    xx = yy = None
    for comp in model.components:
        sysm = model.systems[comp.system]
        if isinstance(comp.profile, galsim.GSObject):
            obj = comp.profile.transform(*sysm.jac.ravel()).shift(*sysm.center)
            obj.drawImage(image=canvas, method="no_pixel", offset=(offset[0] * OVERSAMPLE, offset[1] * OVERSAMPLE))
            _accumulate(fine, comp.colour_group, canvas.array, comp.flux_r)
            continue
        if isinstance(comp.profile, Blobs):
            img = _splat(comp.profile, sysm, size, scale, offset)
        else:
            if xx is None:
                xx, yy = _grid(size, scale, offset)
            inv = np.linalg.inv(sysm.jac)
            dx, dy = xx - sysm.center[0], yy - sysm.center[1]
            img = np.asarray(comp.profile(inv[0, 0] * dx + inv[0, 1] * dy, inv[1, 0] * dx + inv[1, 1] * dy),
                             dtype=np.float64)
        total = img.sum()
        if total > 0:
            _accumulate(coarse, comp.colour_group, img, comp.flux_r / total)
    for g, a in fine.items():
        _accumulate(coarse, g, bin_pixels(a), 1.0)
    return coarse


def _accumulate(groups: dict, group: str, img: np.ndarray, weight: float) -> None:
    if group in groups:
        groups[group] += weight * img
    else:
        groups[group] = weight * img


def taper_window(size: int, inner: float = 0.75) -> np.ndarray:
    """1 inside ``inner`` of the stamp's half-size, falling as cos^2 to 0 at the half-size (round)."""
    ax = (np.arange(size) - (size - 1) / 2.0) / (size / 2.0)
    rho = np.hypot(ax[None, :], ax[:, None])
    t = np.clip((rho - inner) / (1.0 - inner), 0.0, 1.0)
    return np.cos(0.5 * np.pi * t) ** 2


def render(model: Model, bands, kernels, size: int, scale: float, offset=(0.0, 0.0),
           taper: bool = False) -> np.ndarray:
    """(bands, size, size) float32 nanomaggies: each band's colour-weighted groups convolved with its PSF.

    ``taper`` multiplies the intrinsic light by :func:`taper_window`, so that faint wings cut by the
    stamp end smoothly instead of in a visible square edge.

    The convolution is done in Fourier space once per group and band combination: each group is
    transformed once, each band is one inverse transform of the colour-weighted sum times the kernel's
    transform.
    """
    from scipy import fft

    groups = render_groups(model, size, scale, offset)
    out = np.zeros((len(bands), size, size), dtype=np.float32)
    if not groups:
        return out
    if taper:
        window = taper_window(size)
        groups = {g: img * window for g, img in groups.items()}
    k = max(kr.shape[0] for kr in kernels)
    shape = (fft.next_fast_len(size + k - 1, real=True),) * 2
    spectra = {g: fft.rfft2(img, shape) for g, img in groups.items()}
    for i, (band, kernel) in enumerate(zip(bands, kernels)):
        kf = fft.rfft2(kernel, shape)
        total = sum(model.band_factor(g, band) * sp for g, sp in spectra.items())
        full = fft.irfft2(total * kf, shape)
        h = (kernel.shape[0] - 1) // 2
        out[i] = full[h:h + size, h:h + size]
    return out
