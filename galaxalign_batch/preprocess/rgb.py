"""RGB pictures (PNG/JPEG of Galaxy Zoo, Galaxy10, the viewer) to model input: the same exact resampler
as survey cutouts, no stretch (the picture is already stretched), shown north up as pictures are (rows
reversed only for a spec in the legacy ``orientation="fits"``, whose cutouts keep the tile's row order)."""

from __future__ import annotations

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.preprocess.cutouts import make_cutouts
from galaxalign_batch.preprocess.spec import CutoutSpec


def picture_pixscale(shape: tuple[int, int], *, pixscale: float | None = None, angular_size: float | None = None,
                     spec: CutoutSpec) -> float:
    """Arcsec per pixel of a picture of ``shape`` (H, W): ``pixscale`` as given; else ``angular_size`` (the
    arcsec its width spans) / W; else the picture is taken to show the model's field, its longer side
    ``spec.angular_size`` arcsec (the whole picture resized to the model input)."""
    h, w = int(shape[0]), int(shape[1])
    if pixscale is not None and np.isfinite(pixscale):
        return float(pixscale)
    if angular_size is not None and np.isfinite(angular_size):
        return float(angular_size) / w
    return spec.angular_size / max(h, w)


def rgb_cutouts(pictures: list[np.ndarray], pixscales: list[float], spec: CutoutSpec) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) pictures (any sizes) -> ``(pixels (N, 3, S, S) in spec.dtype, masked_fraction (N,))``.

    Each picture is cut to ``spec.angular_size`` arcsec around its centre at its ``pixscale`` and resampled
    to ``spec.out_size`` by :func:`make_cutouts` (box-averaged when shrinking, bilinear when enlarging); what
    lies outside the picture is black and counted in ``masked_fraction``. Values: uint8 0..255 for a uint8
    spec, else [0, 1]."""
    if len(pictures) != len(pixscales):
        raise ConfigError(f"{len(pictures)} pictures but {len(pixscales)} pixel scales")
    none = CutoutSpec(angular_size=spec.angular_size, out_size=spec.out_size, stretch="none", orientation="fits")
    n, s = len(pictures), spec.out_size
    out = np.zeros((n, 3, s, s), dtype=spec.dtype)
    masked = np.zeros(n, np.float32)
    for i, (pic, scale) in enumerate(zip(pictures, pixscales)):
        pic = np.asarray(pic)
        if pic.ndim != 3 or pic.shape[2] != 3:
            raise ConfigError(f"expected an (H, W, 3) RGB picture, got shape {pic.shape}")
        planes = np.ascontiguousarray(np.transpose(pic, (2, 0, 1)), dtype=np.float32)
        h, w = planes.shape[1:]
        batch = make_cutouts(planes, None, [(w - 1) / 2.0], [(h - 1) / 2.0], float(scale), none,
                             bands=("p0", "p1", "p2"))
        values = np.clip(batch.pixels[0], 0.0, 255.0)
        if spec.orientation == "fits":  # a north-up picture in the store's row order (row 0 south)
            values = values[:, ::-1]
        out[i] = np.floor(values + 0.5) if spec.dtype == "uint8" else values / 255.0
        masked[i] = batch.masked_fraction[0]
    return out, masked
