"""`detect`: a trained detector (head or R-CNN) applied to survey tiles, written as one FITS catalogue.

A tile is read with :func:`survey.open_tile` (bricks, cutout cubes; pixels without coverage are 0)
and, when its pixel scale differs from the detector's training fields by more than 5 %, resampled to
it (scikit-image ``resize`` with anti-aliasing, surface brightness per pixel conserved: values x the
pixel-area ratio). It is cut into overlapping **windows** of the training field's size (default 128
px), each detected on its own (its own noise level and, for the head, its own encoder cutout centred
on the window), and a window keeps the detections whose centre lies in its **core** (the window less
``margin`` px on every side that is not a tile edge; cores tile the image without gaps). Boxes that
still overlap across core borders (a large galaxy seen by two windows) are merged by non-maximum
suppression at IoU ``nms_iou`` (0.5), the higher score kept.

Noise per window: the median ``1 / sqrt(invvar)`` of its covered pixels (bricks); without an
inverse variance (viewer cubes) or after resampling, one wavelet estimate per band for the whole
tile (scikit-image ``estimate_sigma``, as ``restore`` does).

Catalogue (FITS binary table, one row per detection, every tile stacked): ``object_id``
(``{tile key}/ldet{i}``, in order of decreasing score within a tile), ``tile`` (the tile key), ``ra``,
``dec`` (deg, from the tile's WCS), ``x``, ``y`` (0-based tile pixels, the box centre), ``box``
(x0, y0, x1, y1: 0-based tile pixels; pixel ``i`` spans ``i - 0.5 .. i + 0.5``), ``score`` (0-1),
``flux_r`` (nanomaggies: the r-band pixels whose centres lie in the box, a box aperture, not a
photometric measurement). The header records the detector file's digest, its kind, the window,
margin and score threshold.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from astropy.table import Table, vstack

from galaxalign_batch import atomic
from galaxalign_batch.errors import ConfigError, GalaxAlignError

log = logging.getLogger(__name__)

BANDS = ("g", "r", "z")
DEFAULT_SCORE = 0.3


def _predict(model, images: np.ndarray, sigma: np.ndarray, pixscale: float, min_score: float,
             precision: str = "fp32") -> list:
    from galaxalign_batch.detection import head as H
    from galaxalign_batch.detection import rcnn as R

    if isinstance(model, R.RCNNDetector):
        return R.predict(model, images, sigma, min_score=min_score)  # fp32 (see detect_tiles)
    return H.predict(model, images, sigma, pixscale=pixscale, min_score=min_score, precision=precision)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    import torch
    from torchvision.ops import nms

    if not len(boxes):
        return np.zeros(0, np.int64)
    return nms(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32),
               iou).numpy()


def prepare_tile(tile, pixscale: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, float]:
    """(g, r, z) pixels (0 without coverage) at ``pixscale``, the inverse variance (None after resampling or
    without one), the coverage mask and the factor ``f`` (new pixel = old pixel x f)."""
    missing = [b for b in BANDS if b not in tile.bands]
    if missing:
        raise ConfigError(f"{tile.path}: the tile has bands {''.join(tile.bands)}; the detector needs "
                          f"{''.join(BANDS)} (missing {''.join(missing)})")
    idx = [tile.bands.index(b) for b in BANDS]
    valid = np.asarray(tile.valid)[idx]
    image = np.where(valid, np.asarray(tile.image, np.float32)[idx], 0.0).astype(np.float32)
    invvar = None if tile.invvar is None else np.asarray(tile.invvar, np.float32)[idx]
    f = tile.pixscale / pixscale
    if abs(f - 1) <= 0.05:
        return image, invvar, valid.all(axis=0), 1.0
    from skimage.transform import resize

    h, w = image.shape[1:]
    nh, nw = max(8, int(round(h * f))), max(8, int(round(w * f)))
    f = nw / w
    out = np.stack([resize(p, (nh, nw), order=1, anti_aliasing=f < 1, preserve_range=True) for p in image])
    out = (out * (pixscale / tile.pixscale) ** 2).astype(np.float32)
    cov = resize(valid.all(axis=0).astype(np.float32), (nh, nw), order=0, anti_aliasing=False) > 0.5
    log.info("%s: resampled from %.3g\"/px to the detector's %.3g\"/px (%d x %d px)", tile.path, tile.pixscale,
             pixscale, nw, nh)
    return out, None, cov, f


def detect_tile(model, tile, *, window: int | None = None, margin: int = 16, min_score: float = DEFAULT_SCORE,
                nms_iou: float = 0.5, key: str | None = None, precision: str = "fp32") -> tuple[Table, dict]:
    """Detections of ``model`` on ``tile`` (the catalogue's columns, see the module docstring) and what was done
    (``precision``: a head's forward passes, resolved fp32 or bf16)."""
    from galaxalign_batch.survey.windows import wavelet_sigma, window_jobs

    cfg = model.config
    image, invvar, covered, f = prepare_tile(tile, cfg.pixscale)
    _, h, w = image.shape
    window = int(window or cfg.field)
    if window < 16 or margin < 0 or 2 * margin >= window:
        raise ConfigError(f"--window must be at least 16 px and more than twice --margin, got {window}, {margin}")
    win_y, win_x = min(window, h), min(window, w)
    whole = None
    if invvar is None:
        whole = wavelet_sigma(image, covered)
        if not np.all(np.isfinite(whole) & (whole > 0)):
            raise ConfigError(f"{tile.path}: cannot estimate the noise of every band (no coverage?)")
    jobs = window_jobs(h, w, win_y, win_x, margin)
    from galaxalign_batch.detection.fields import field_sigma

    preds = []
    batch = 16          # windows in memory at once (a 3600-px brick has ~1,000 windows of 128 px)
    for k in range(0, len(jobs), batch):
        part = jobs[k:k + batch]
        stamps = np.stack([image[:, y0:y0 + win_y, x0:x0 + win_x] for y0, x0, *_ in part])
        sig = np.stack([whole if invvar is None else field_sigma(invvar[:, y0:y0 + win_y, x0:x0 + win_x], stamps[j])
                        for j, (y0, x0, *_) in enumerate(part)]).astype(np.float32)
        preds += _predict(model, stamps, sig, cfg.pixscale, min_score, precision)
    boxes, scores = [], []
    for (y0, x0, ya, yb, xa, xb), (b, s) in zip(jobs, preds):
        b = np.asarray(b, np.float64).reshape(-1, 4) + np.array([x0, y0, x0, y0])
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        core = (cx >= xa - 0.5) & (cx < xb - 0.5) & (cy >= ya - 0.5) & (cy < yb - 0.5)
        boxes.append(b[core])
        scores.append(np.asarray(s, np.float64)[core])
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    scores = np.concatenate(scores) if scores else np.zeros(0)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    ok = covered[np.clip(np.round(cy).astype(int), 0, h - 1), np.clip(np.round(cx).astype(int), 0, w - 1)] \
        if len(boxes) else np.zeros(0, bool)
    boxes, scores = boxes[ok], scores[ok]
    keep = _nms(boxes, scores, nms_iou)
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    from galaxalign_batch.detection.evaluate import box_flux

    flux = box_flux(image[1], boxes) / (f * f) if len(boxes) else np.zeros(0)  # back to the tile's pixel area
    tb = (boxes + 0.5) / f - 0.5                                            # tile pixel coordinates
    x, y = (tb[:, 0] + tb[:, 2]) / 2, (tb[:, 1] + tb[:, 3]) / 2
    ra, dec = tile.pixel_to_world(x, y) if len(tb) else (np.zeros(0), np.zeros(0))
    key = key or tile.name
    table = Table({"object_id": np.array([f"{key}/ldet{i}" for i in range(len(tb))], dtype=str),
                   "tile": np.array([key] * len(tb), dtype=str),
                   "ra": np.asarray(ra, np.float64), "dec": np.asarray(dec, np.float64),
                   "x": x, "y": y, "box": tb.reshape(-1, 4), "score": scores.astype(np.float32),
                   "flux_r": flux.astype(np.float32)})
    return table, {"windows": len(jobs), "window": [win_y, win_x], "resampled": f != 1.0, "scale": f,
                   "sigma": "invvar (per window)" if invvar is not None else "wavelet estimate (tile)"}


@dataclass
class DetectSummary:
    out: str
    tiles: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    precision: str = "fp32"

    def lines(self) -> list[str]:
        n = sum(k for _, k in self.tiles)
        out = [f"{n} detection(s) in {len(self.tiles)} tile(s) written to {self.out} in {self.seconds:.1f} s "
               f"({self.precision})"]
        out += [f"  {name}: {k}" for name, k in self.tiles]
        if self.failed:
            out.append(f"{len(self.failed)} tile(s) failed:")
            out += [f"  {name}: {why}" for name, why in self.failed]
        return out


def detect_tiles(tiles: Sequence[str], model_path: str | os.PathLike, out: str | os.PathLike, *,
                 bricks: Sequence[str] | None = None, device: str = "cpu", window: int | None = None,
                 margin: int = 16, min_score: float = DEFAULT_SCORE, nms_iou: float = 0.5,
                 force: bool = False, precision: str = "auto") -> DetectSummary:
    """Detect every tile of ``tiles`` (as ``--tiles`` resolves them) with the detector at ``model_path``
    and write one catalogue ``out`` (FITS). A tile that cannot be read is reported and the others go on.
    ``precision``: a head detector's forward passes, ``auto`` (bf16 where ``device`` runs it natively, else
    fp32), ``fp32`` or ``bf16``; Faster R-CNN runs in fp32. Recorded in the catalogue's ``PRECISN``."""
    from galaxalign_batch.detection.files import load_detector, read_detector_info
    from galaxalign_batch.detection.rcnn import RCNNDetector
    from galaxalign_batch.model.precision import resolve_precision
    from galaxalign_batch.model.spec import file_digest
    from galaxalign_batch.progress import bar
    from galaxalign_batch.survey import open_tile
    from galaxalign_batch.survey.tiles import resolve_tiles

    t0 = time.perf_counter()
    out = os.fspath(out)
    if os.path.exists(out) and not force:
        raise ConfigError(f"{out} exists (--force replaces it)")
    if not out.lower().endswith((".fits", ".fit", ".fits.gz")):
        raise ConfigError(f"--out {out}: the catalogue is a FITS table (name it .fits)")
    if not 0 <= min_score <= 1:
        raise ConfigError(f"--min-score must be in [0, 1], got {min_score}")
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise ConfigError(f"{model_path}: no such detector file")
    info = read_detector_info(model_path)
    refs = resolve_tiles(list(tiles), bricks)
    if not refs:
        raise ConfigError(f"--tiles {' '.join(tiles)}: no tiles found")
    precision = resolve_precision(precision, device)
    model = load_detector(model_path, device=device)
    if isinstance(model, RCNNDetector) and precision != "fp32":
        log.info("Faster R-CNN runs in fp32 (--precision applies to head detectors)")
        precision = "fp32"
    summary = DetectSummary(out, precision=precision)
    parts = []
    for ref in bar(refs, total=len(refs), desc="detecting", unit="tile"):
        try:
            if str(ref.path).lower().endswith((".png", ".jpg", ".jpeg")):
                raise ConfigError("a picture has no calibrated flux: detect takes FITS tiles")
            tile = open_tile(ref.path, ref.brick)
            t, _ = detect_tile(model, tile, window=window, margin=margin, min_score=min_score, nms_iou=nms_iou,
                               key=ref.name, precision=precision)
            parts.append(t)
            summary.tiles.append((ref.name, len(t)))
        except GalaxAlignError as e:
            log.warning("tile %s failed: %s", ref.name, e)
            summary.failed.append((ref.name, " ".join(str(e).split())))
    table = vstack(parts, metadata_conflicts="silent") if parts else Table(
        {"object_id": np.zeros(0, str), "tile": np.zeros(0, str), "ra": np.zeros(0), "dec": np.zeros(0),
         "x": np.zeros(0), "y": np.zeros(0), "box": np.zeros((0, 4)), "score": np.zeros(0, np.float32),
         "flux_r": np.zeros(0, np.float32)})
    table.meta.update({"DETECTOR": info.get("kind", "")[:60], "DETSHA": file_digest(model_path),
                       "WINDOW": int(window or model.config.field), "MARGIN": int(margin),
                       "MINSCORE": float(min_score), "NMSIOU": float(nms_iou), "PRECISN": precision})
    with atomic.replacing(out) as tmp:
        table.write(tmp, format="fits", overwrite=True)
    summary.seconds = time.perf_counter() - t0
    return summary
