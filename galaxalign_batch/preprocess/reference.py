"""Slow NumPy reference of `make_cutouts`, for the tests only (nothing else imports it).

Resampling is written as dense weight matrices: ``out = Wy @ (valid * img) @ Wx.T`` normalised by
``Wy @ valid @ Wx.T``, with the weights taken straight from their definitions (pixel-overlap box
filter for step > 1, triangle / bilinear otherwise); the stretches are direct transcriptions of
legacypipe ``sdss_rgb`` and of the per-band asinh.
"""

from __future__ import annotations

import math

import numpy as np

from galaxalign_batch.preprocess.spec import CutoutSpec


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


def reference_cutouts(image, valid, x, y, pixscale, spec: CutoutSpec, bands=("g", "r", "z")):
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
        else:
            soft = dict(spec.asinh_softening)
            top = dict(spec.asinh_max)
            for b, band in enumerate(bands):
                v = np.clip(np.arcsinh(vals[b] / soft[band]) / np.arcsinh(top[band] / soft[band]), 0, 1)
                out[n, planes[band]] = np.where(missing[b], spec.fill, v)
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
