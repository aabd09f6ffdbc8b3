"""Numpy light for the structures galsim has no profile for: spiral arms, clumps, tidal arcs.

:func:`spiral_arms` returns a field ``f(x, y) -> intensity`` in a system's own frame (arcsec);
clumps, arcs and bridges are :class:`Blobs`. The renderer normalises each to its component's flux.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def spiral_arms(*, n_arms: int, pitch_deg: float, r_start: float, scale_length: float, phase: float,
                chirality: int, sharpness: float, r_taper: float | None = None):
    """Logarithmic-spiral arms on an exponential disk.

    Arm ``k`` runs along ``theta = phase + 2 pi k / n_arms + chirality * ln(r / r_start) / tan(pitch)``,
    starting at ``r_start`` (a bar's end, or the bulge's edge); the arm cross-section is
    ``((1 + cos psi) / 2) ** sharpness`` of the arm phase ``psi`` (larger = thinner arms).
    """
    cot = 1.0 / np.tan(np.radians(pitch_deg))
    r_taper = r_start if r_taper is None else r_taper

    def f(x, y):
        x, y = x.astype(np.float32), y.astype(np.float32)
        r = np.hypot(x, y)
        theta = np.arctan2(y, x)
        wind = np.float32(chirality * cot) * np.log(np.maximum(r, np.float32(r_start)) / np.float32(r_start))
        psi = n_arms * (theta - np.float32(phase) - wind)
        base = np.float32(0.5) + np.float32(0.5) * np.cos(psi) + np.float32(1e-12)
        arm = np.exp(np.float32(sharpness) * np.log(base))   # base ** sharpness, faster
        envelope = np.exp(-r / np.float32(scale_length)) * (1.0 - np.exp(-(r / np.float32(r_taper)) ** 3))
        return arm * envelope

    return f


def arm_points(rng: np.random.Generator, n: int, *, n_arms: int, pitch_deg: float, r_start: float,
               r_max: float, phase: float, chirality: int, scatter: float = 0.08) -> np.ndarray:
    """``n`` (x, y) points along the arms of :func:`spiral_arms` (for star-forming knots)."""
    cot = 1.0 / np.tan(np.radians(pitch_deg))
    r = r_start * np.exp(rng.uniform(0.0, np.log(max(r_max / r_start, 1.01)), n))
    k = rng.integers(0, n_arms, n)
    theta = phase + 2 * np.pi * k / n_arms + chirality * np.log(r / r_start) * cot + rng.normal(0, scatter, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


@dataclass(frozen=True)
class Blobs:
    """Round Gaussian clumps at ``points`` (system frame, arcsec) with relative ``weights`` and
    ``sigmas`` (arcsec). The renderer places each clump at its transformed centre and splats it on
    the pixels within 4 sigma, which is far cheaper than evaluating every clump on every pixel."""

    points: np.ndarray
    weights: np.ndarray
    sigmas: np.ndarray


def blobs(points, weights, sigmas) -> Blobs:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    weights = np.asarray(weights, dtype=np.float64)
    return Blobs(points, weights, np.broadcast_to(np.asarray(sigmas, dtype=np.float64), weights.shape).copy())


def arc(*, r0: float, r1: float, phi0: float, dphi: float, w0: float, w1: float, fade: float = 1.0,
        n: int = 40) -> Blobs:
    """A tidal tail / plume: a curved band from radius ``r0`` to ``r1`` while the angle turns by
    ``dphi`` (radians), widening from ``w0`` to ``w1`` (Gaussian sigma, arcsec) and fading along its
    length with e-folding ``fade`` (in units of the length)."""
    t = np.linspace(0.0, 1.0, n)
    rad = r0 + (r1 - r0) * t
    ang = phi0 + dphi * t
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    sig = w0 + (w1 - w0) * t
    return blobs(pts, np.exp(-t / fade) * sig, sig)


def bridge(p0, p1, *, width: float, sag: float, n: int = 24) -> Blobs:
    """A faint curved bridge of light from ``p0`` to ``p1`` (sag: sideways bow, arcsec)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    t = np.linspace(0.1, 0.9, n)
    d = p1 - p0
    normal = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-9)
    pts = p0 + t[:, None] * d + (sag * 4 * t * (1 - t))[:, None] * normal
    return blobs(pts, np.full(n, 1.0), np.full(n, width))
