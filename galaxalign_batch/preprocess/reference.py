"""Slow NumPy reference of `make_cutouts`, for the tests only (nothing else imports it).

Resampling is written as dense weight matrices: ``out = Wy @ (valid * img) @ Wx.T`` normalised by
``Wy @ valid @ Wx.T``, with the weights taken straight from their definitions (pixel-overlap box
filter for step > 1, triangle / bilinear otherwise); the stretches are direct transcriptions of
legacypipe ``sdss_rgb``, of the per-band asinh and of the Galaxy Zoo DECaLS ``dr2_style_rgb``
(zooniverse/decals). Orientation: the Legacy Survey convention (north-up = rows flipped).
"""

from __future__ import annotations

import math

import numpy as np

from galaxalign_batch.preprocess.spec import CutoutSpec
from galaxalign_batch.survey.layout import BANDS


def axis_weights(centre: float, step: float, n_out: int, size: int) -> np.ndarray:
    """(n_out, size) weights of the image pixels for each output pixel along one axis."""
    c = centre + (np.arange(n_out) - (n_out - 1) / 2.0) * step
    p = np.arange(size, dtype=np.float64)
    if step > 1.0:
        lo = np.maximum(c[:, None] - step / 2, p[None, :] - 0.5)
        hi = np.minimum(c[:, None] + step / 2, p[None, :] + 0.5)
        return np.clip(hi - lo, 0.0, None) / step
    return np.clip(1.0 - np.abs(c[:, None] - p[None, :]), 0.0, None)


def resample(image, valid, x, y, step, n_out):
    """(values (nb, S, S) float64 with NaN where no valid weight, valid weight (nb, S, S))."""
    nb, height, width = image.shape
    ok = np.isfinite(image) if valid is None else (valid & np.isfinite(image))
    wy = axis_weights(y, step, n_out, height)
    wx = axis_weights(x, step, n_out, width)
    vals = np.full((nb, n_out, n_out), np.nan)
    wvalid = np.zeros((nb, n_out, n_out))
    for b in range(nb):
        okb = ok[b].astype(np.float64)
        num = wy @ np.where(ok[b], image[b].astype(np.float64), 0.0) @ wx.T
        den = wy @ okb @ wx.T
        wvalid[b] = den
        has = den > 0
        vals[b][has] = num[has] / den[has]
    return vals, wvalid


def sdss_rgb(imgs, bands, scales, m, Q):
    """legacypipe ``sdss_rgb`` (py/legacypipe/survey.py), grz branch, mnmx=None, clip=True.

    ``scales``: {band: (plane, scale)}. Returns (H, W, 3) in [0, 1].
    """
    I = 0
    for img, band in zip(imgs, bands):
        _, scale = scales[band]
        img = np.maximum(0, img * scale + m)
        I = I + img
    I /= len(bands)
    fI = np.arcsinh(Q * I) / np.sqrt(Q)
    I += (I == 0.0) * 1e-6
    I = fI / I
    H, W = I.shape
    rgb = np.zeros((H, W, 3), np.float32)
    for img, band in zip(imgs, bands):
        plane, scale = scales[band]
        rgb[:, :, plane] = np.clip((img * scale + m) * I, 0, 1)
    return rgb


def gz_decals_rgb(imgs, bands, scales, mn, mx, desaturate=True):
    """Galaxy Zoo DECaLS stretch as zooniverse/decals ``dr2_style_rgb`` with ``arcsinh=1``, whole planes.

    ``scales``: {band: (plane, divisor)}. Returns (H, W, 3) in [0, 1]; planes not given stay 0 (and
    take part in the desaturation mean, as there).
    """
    h, w = imgs[0].shape
    planes = np.zeros((3, h, w), np.float32)
    for img, band in zip(imgs, bands):
        plane, div = scales[band]
        planes[plane] = (np.asarray(img) / div).astype(np.float32)
    lo, hi = np.arcsinh(mn), np.arcsinh(mx)
    planes = (np.arcsinh(planes) - lo) / (hi - lo)
    if desaturate:
        mean = planes.mean(axis=0)
        mean = np.where(mean == 0.0, 1.0, mean)
        weight = np.minimum((planes / mean / 2.5).max(axis=0), 1.0)
        weight = np.sin((1.0 - weight) * np.pi / 2.0)
        planes = planes * weight + mean * (1 - weight) + mean * (1 - weight) ** 2 * planes
    return np.clip(planes, 0.0, 1.0).transpose(1, 2, 0)


def reference_cutouts(image, valid, x, y, pixscale, spec: CutoutSpec, bands=BANDS):
    """(pixels (N, 3, S, S) float64 in output units before dtype conversion, masked_fraction (N,))."""
    step = spec.step(pixscale)
    size = spec.out_size
    nb = len(bands)
    out = np.zeros((len(x), 3, size, size))
    masked = np.zeros(len(x))
    planes = dict(spec.band_planes)
    for n in range(len(x)):
        vals, wvalid = resample(image, valid, float(x[n]), float(y[n]), step, size)
        masked[n] = float(np.mean(1.0 - wvalid))
        missing = np.isnan(vals)
        if spec.stretch == "none":
            out[n, :nb] = np.where(missing, spec.fill, vals)
            continue
        if spec.stretch == "lupton":
            scales = {b: (planes[b], dict(spec.lupton_scales)[b]) for b in bands}
            if missing.any():  # mean over the bands present at each pixel
                rgb = _lupton_with_missing(vals, missing, bands, scales, spec.lupton_m, spec.lupton_q)
            else:
                rgb = sdss_rgb(list(vals), list(bands), scales, spec.lupton_m, spec.lupton_q)
            for b, band in enumerate(bands):
                out[n, planes[band]] = np.where(missing[b], spec.fill, rgb[:, :, planes[band]])
        elif spec.stretch == "gz-decals":
            scales = {b: (planes[b], dict(spec.gz_scales)[b]) for b in bands}
            if missing.any() or nb != 3:
                raise NotImplementedError("the gz-decals reference takes 3 bands fully covered")
            rgb = gz_decals_rgb(list(vals), list(bands), scales, spec.gz_min, spec.gz_max, spec.gz_desaturate)
            for band in bands:
                out[n, planes[band]] = rgb[:, :, planes[band]]
        else:
            soft = dict(spec.asinh_softening)
            top = dict(spec.asinh_max)
            for b, band in enumerate(bands):
                v = np.clip(np.arcsinh(vals[b] / soft[band]) / np.arcsinh(top[band] / soft[band]), 0, 1)
                out[n, planes[band]] = np.where(missing[b], spec.fill, v)
    if spec.orientation == "north-up":  # Legacy Survey convention: row 0 of the array is south
        out = out[:, :, ::-1, :].copy()
    return out, masked


def _lupton_with_missing(vals, missing, bands, scales, m, Q):
    """The viewer stretch with the intensity averaged over the bands present at each pixel."""
    terms = np.stack([np.where(missing[b], 0.0, np.maximum(0, vals[b] * scales[band][1] + m))
                      for b, band in enumerate(bands)])
    count = (~missing).sum(axis=0)
    intensity = terms.sum(axis=0) / np.maximum(count, 1)
    factor = np.where(intensity > 0, np.arcsinh(Q * intensity) / math.sqrt(Q) / np.where(intensity > 0, intensity, 1), 0.0)
    rgb = np.zeros(vals.shape[1:] + (3,))
    for b, band in enumerate(bands):
        rgb[:, :, scales[band][0]] = np.clip((np.nan_to_num(vals[b]) * scales[band][1] + m) * factor, 0, 1)
    return rgb
