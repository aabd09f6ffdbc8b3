"""Training and evaluation fields cut from simulated bricks, with the simulator's truth boxes.

A *field* is a ``size`` x ``size`` px window (default 128 px = 33.5" at 0.262"/px) of a brick, on a
regular grid of non-overlapping windows; a field with any pixel without coverage in some band is
left out (the models are taught on covered sky only). Its pixels are float32 nanomaggies
``(3, size, size)`` in g, r, z; ``sigma`` is the per-band noise of the field (median
``1 / sqrt(invvar)`` over its pixels).

**Truth boxes** come from the brick's Tractor-like catalogue (truth columns included): a source of
half-light radius ``r`` (``true_r_half``, 0 for stars), axis ratio ``q`` and position angle ``phi``
(from ``shape_e1``, ``shape_e2``, east of north) is an ellipse with semi-axes

    A = BOX_FACTOR * sqrt(r^2 + (FWHM/2)^2),   B = BOX_FACTOR * sqrt((q r)^2 + (FWHM/2)^2)

(the half-light ellipse convolved with the PSF, as a Gaussian would add, times ``BOX_FACTOR`` = 2;
FWHM the catalogue's ``psfsize_r``), and its box is that ellipse's axis-aligned bounding box, in
0-based pixel coordinates ``x0, y0, x1, y1`` (edges: a box around pixel ``(x, y)`` of half-width
``h`` is ``x - h .. x + h``). A star's box is 2 FWHM wide (~10 px). The sizes are the catalogue's,
not the full extent of a merger or a tidal tail.

Every source whose box overlaps the field is in the field's truth, its box clipped to the field;
``inside`` marks those whose centre lies in the field. Training targets are the ``inside`` sources;
in evaluation the others are *ignored* (a detection that matches one counts neither way), so a galaxy
centred just outside the field, drawn into it, is not a false positive.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from astropy.table import Table, vstack

from galaxalign_batch import atomic
from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

BOX_FACTOR = 2.0
DEFAULT_FIELD = 128
DEFAULT_FWHM = 1.3


@dataclass
class FieldSet:
    """Fields and their truth. ``truth`` has one row per (field, source): ``field`` (index), ``x``, ``y``
    (field pixels), ``x0``, ``y0``, ``x1``, ``y1`` (clipped box), ``inside``, ``true_mag_r``,
    ``true_r_half``, ``star``, ``true_class_key``, ``psfsize_r``; ``origin`` one row per field:
    ``tile`` (key), ``brick``, ``x0``, ``y0`` (the field's first pixel in the brick)."""

    images: np.ndarray
    sigma: np.ndarray
    truth: Table
    origin: Table
    pixscale: float

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index) -> "FieldSet":
        """The fields ``index`` (renumbered 0..)."""
        index = np.asarray(index, np.int64)
        new = np.full(len(self), -1, np.int64)
        new[index] = np.arange(len(index))
        rows = np.isin(np.asarray(self.truth["field"]), index)
        truth = self.truth[rows]
        truth["field"] = new[np.asarray(truth["field"])]
        order = np.argsort(np.asarray(truth["field"]), kind="stable")
        return FieldSet(self.images[index], self.sigma[index], truth[order], self.origin[index], self.pixscale)

    def boxes(self, i: int, inside_only: bool = True) -> np.ndarray:
        """(k, 4) float32 boxes of field ``i`` (only sources centred in it by default)."""
        t = self.truth
        sel = np.asarray(t["field"]) == i
        if inside_only:
            sel &= np.asarray(t["inside"], bool)
        return np.stack([np.asarray(t[c], np.float32)[sel] for c in ("x0", "y0", "x1", "y1")], 1).reshape(-1, 4)

    def save(self, path: str | os.PathLike) -> None:
        """One ``.npz`` (pixels, noise) plus the tables as FITS beside it (``PATH.truth.fits``, ``PATH.origin.fits``),
        each file replaced whole, the ``.npz`` last (a set killed while being saved has no new ``.npz``)."""
        base = os.fspath(path).removesuffix(".npz")
        for name, table in ((".truth.fits", self.truth), (".origin.fits", self.origin)):
            with atomic.replacing(base + name) as tmp:
                table.write(tmp, format="fits", overwrite=True)
        with atomic.replacing(base + ".npz") as tmp:
            np.savez(tmp, images=self.images, sigma=self.sigma, pixscale=self.pixscale)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FieldSet":
        base = os.fspath(path).removesuffix(".npz")
        with np.load(base + ".npz") as z:
            images, sigma, pixscale = z["images"], z["sigma"], float(z["pixscale"])
        return cls(images, sigma, Table.read(base + ".truth.fits"), Table.read(base + ".origin.fits"), pixscale)


def truth_boxes(ref: Table, pixscale: float, box_factor: float = BOX_FACTOR) -> np.ndarray:
    """(n, 4) boxes ``x0, y0, x1, y1`` (tile pixels) of a catalogue's sources (see the module docstring)."""
    n = len(ref)
    r = np.asarray(ref["true_r_half"] if "true_r_half" in ref.colnames else ref["shape_r"], np.float64)
    r = np.where(np.isfinite(r) & (r > 0), r, 0.0)
    fwhm = np.asarray(ref["psfsize_r"], np.float64) if "psfsize_r" in ref.colnames else np.full(n, DEFAULT_FWHM)
    fwhm = np.where(np.isfinite(fwhm) & (fwhm > 0), fwhm, DEFAULT_FWHM)
    e1 = np.asarray(ref["shape_e1"], np.float64) if "shape_e1" in ref.colnames else np.zeros(n)
    e2 = np.asarray(ref["shape_e2"], np.float64) if "shape_e2" in ref.colnames else np.zeros(n)
    e = np.clip(np.hypot(e1, e2), 0, 0.95)
    q = (1 - e) / (1 + e)
    phi = 0.5 * np.arctan2(e2, e1)       # east of north; x is east-west, y north-south
    a = box_factor * np.hypot(r, fwhm / 2) / pixscale
    b = box_factor * np.hypot(q * r, fwhm / 2) / pixscale
    hx = np.sqrt((a * np.sin(phi)) ** 2 + (b * np.cos(phi)) ** 2)
    hy = np.sqrt((a * np.cos(phi)) ** 2 + (b * np.sin(phi)) ** 2)
    x, y = np.asarray(ref["x"], np.float64), np.asarray(ref["y"], np.float64)
    return np.stack([x - hx, y - hy, x + hx, y + hy], 1)


def field_sigma(invvar: np.ndarray | None, image: np.ndarray) -> np.ndarray:
    """Per-band noise (nanomaggies) of a field: median ``1/sqrt(invvar)``; without invvar the MAD of the pixels."""
    out = np.empty(image.shape[0], np.float64)
    for b in range(image.shape[0]):
        good = None if invvar is None else invvar[b][(invvar[b] > 0) & np.isfinite(invvar[b])]
        if good is not None and len(good):
            out[b] = float(np.median(1.0 / np.sqrt(good)))
        else:
            v = image[b][np.isfinite(image[b])]
            out[b] = 1.4826 * float(np.median(np.abs(v - np.median(v)))) if len(v) else 1.0
    return np.maximum(out, 1e-6)


def cut_fields(root: str | os.PathLike, bricks: list[str] | None = None, *, size: int = DEFAULT_FIELD,
               limit: int | None = None) -> FieldSet:
    """Fields of ``size`` px from the simulated bricks under ``root`` (all, or ``bricks``), with truth boxes.

    Fields are taken brick by brick, rows then columns; ``limit`` stops after that many.
    """
    from galaxalign_batch.survey import layout, open_tile
    from galaxalign_batch.survey.detection_quality import read_reference

    if size < 16:
        raise ConfigError(f"a field must be at least 16 px, got {size}")
    names = list(bricks) if bricks else layout.list_bricks(root)
    if not names:
        raise ConfigError(f"{root}: no bricks")
    images, sigmas, truths, origins = [], [], [], []
    pixscale = None
    for name in names:
        tile = open_tile(os.fspath(root), name)
        missing = [b for b in ("g", "r", "z") if b not in tile.bands]
        if missing:
            raise ConfigError(f"{tile.path}: fields need g, r, z (missing {''.join(missing)})")
        idx = [tile.bands.index(b) for b in ("g", "r", "z")]
        path = layout.tractor_path(os.fspath(root), name)
        if not os.path.exists(path):
            raise ConfigError(f"{root}: brick {name} has no truth catalogue ({path})")
        ref = read_reference(path, tile)
        if "true_r_half" not in ref.colnames:
            raise ConfigError(f"{path}: no truth columns (true_r_half): fields need a simulated survey")
        pixscale = float(tile.pixscale)
        boxes = truth_boxes(ref, pixscale)
        valid = np.asarray(tile.valid)[idx].all(axis=0)
        img = np.asarray(tile.image, np.float32)[idx]
        inv = None if tile.invvar is None else np.asarray(tile.invvar, np.float32)[idx]
        h, w = valid.shape
        x, y = np.asarray(ref["x"], np.float64), np.asarray(ref["y"], np.float64)
        for y0 in range(0, h - size + 1, size):
            for x0 in range(0, w - size + 1, size):
                if limit is not None and len(images) >= limit:
                    break
                if not valid[y0:y0 + size, x0:x0 + size].all():
                    continue
                k = len(images)
                images.append(img[:, y0:y0 + size, x0:x0 + size].copy())
                sigmas.append(field_sigma(None if inv is None else inv[:, y0:y0 + size, x0:x0 + size],
                                          images[-1]))
                lo, hi = -0.5, size - 0.5   # pixel edges of the field
                b = boxes - np.array([x0, y0, x0, y0])
                cb = np.stack([np.clip(b[:, 0], lo, hi), np.clip(b[:, 1], lo, hi),
                               np.clip(b[:, 2], lo, hi), np.clip(b[:, 3], lo, hi)], 1)
                keep = (cb[:, 2] - cb[:, 0] > 1) & (cb[:, 3] - cb[:, 1] > 1)
                fx, fy = x - x0, y - y0
                inside = (fx >= lo) & (fx < hi) & (fy >= lo) & (fy < hi)
                sel = np.flatnonzero(keep | inside)
                truths.append(Table({
                    "field": np.full(len(sel), k, np.int64), "x": fx[sel], "y": fy[sel],
                    "x0": cb[sel, 0], "y0": cb[sel, 1], "x1": cb[sel, 2], "y1": cb[sel, 3], "inside": inside[sel],
                    "true_mag_r": np.asarray(ref["true_mag_r"], np.float64)[sel],
                    "true_r_half": np.asarray(ref["true_r_half"], np.float64)[sel],
                    "true_class_key": np.asarray(ref["true_class_key"]).astype(str)[sel],
                    "star": np.char.strip(np.asarray(ref["true_class_key"]).astype(str))[sel] == "star",
                    "psfsize_r": np.asarray(ref["psfsize_r"], np.float64)[sel]}))
                origins.append((tile.name, name, x0, y0))
    if not images:
        raise ConfigError(f"{root}: no fully covered {size}-px field in the bricks")
    truth = vstack(truths, metadata_conflicts="silent") if truths else Table()
    origin = Table(rows=origins, names=("tile", "brick", "x0", "y0"))
    log.info("cut %d fields of %d px (%d truth sources) from %s", len(images), size, len(truth), root)
    return FieldSet(np.stack(images), np.stack(sigmas).astype(np.float32), truth, origin, pixscale)


def normalise(images: np.ndarray, sigma: np.ndarray, compress: float = 4.0) -> np.ndarray:
    """What both learned detectors see: ``A asinh(z / A) / A`` of ``z = image / sigma`` per band (A = ``compress``):
    linear in the sky noise, logarithmic in bright cores, ~0-3 for most pixels."""
    z = np.asarray(images, np.float32) / np.asarray(sigma, np.float32)[..., None, None]
    return (np.arcsinh(z / compress)).astype(np.float32)

