"""Evaluating detectors on held-out fields: box metrics (``metrics``) and the project's position-based
detection quality (``survey.detection_quality``: completeness by magnitude, blended pairs, purity).

Box metrics: per field, the truth boxes of every source overlapping it, those centred outside the
field *ignored* (``fields``); P, R, F1 at IoU 0.5 for the detections with score >= ``score_threshold``,
AP at IoU 0.5 over all detections.

Position metrics: the detections above the threshold (their box centres) against the truth sources
with :func:`survey.detection_quality.compare_catalogs` (one-to-one match within max(1.5", r_half)).
Each field is placed on its own patch of a flat sky (``ra = (2 S k + x) p``, ``dec = y p`` for field
``k`` of side ``S`` px at ``p`` deg / px, near the equator), so a match never crosses fields; sources
and detections within ``edge_arcsec`` of the field border are matched but not counted. A detection's
``flux_r`` (for purity by magnitude) is the sum of the r-band pixels whose centres lie in its box.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from galaxalign_batch.detection.fields import FieldSet
from galaxalign_batch.detection.metrics import evaluate_boxes

DEFAULT_SCORE = 0.3
FIELD_EDGE_ARCSEC = 1.5


def box_flux(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Sum of ``image`` (H, W) over the pixels whose centres lie in each box (x0, y0, x1, y1)."""
    h, w = image.shape
    c = np.pad(np.cumsum(np.cumsum(np.asarray(image, np.float64), 0), 1), ((1, 0), (1, 0)))
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.clip(np.ceil(b[:, 0]), 0, w).astype(int)
    y0 = np.clip(np.ceil(b[:, 1]), 0, h).astype(int)
    x1 = np.clip(np.floor(b[:, 2]) + 1, 0, w).astype(int)
    y1 = np.clip(np.floor(b[:, 3]) + 1, 0, h).astype(int)
    x1, y1 = np.maximum(x1, x0), np.maximum(y1, y0)
    return c[y1, x1] - c[y0, x1] - c[y1, x0] + c[y0, x0]


def _sky(k: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, pixscale: float) -> tuple[np.ndarray, np.ndarray]:
    p = pixscale / 3600.0
    return (2 * size * np.asarray(k, np.float64) + np.asarray(x, np.float64)) * p, np.asarray(y, np.float64) * p


def evaluate(predictions: list[tuple[np.ndarray, np.ndarray]], fields: FieldSet, *,
             score_threshold: float = DEFAULT_SCORE, iou: float = 0.5, edge_arcsec: float = FIELD_EDGE_ARCSEC) -> dict:
    """Box and position metrics of per-field ``(boxes, scores)`` on ``fields``; returns a JSON-able dict
    (``box``: P, R, F1, AP; ``position``: ``DetectionReport.as_dict()``; ``position_lines``: its text)."""
    from galaxalign_batch.survey.detection_quality import compare_catalogs

    t = fields.truth
    tf = np.asarray(t["field"])
    truths = []
    for i in range(len(fields)):
        sel = tf == i
        bx = np.stack([np.asarray(t[c], np.float64)[sel] for c in ("x0", "y0", "x1", "y1")], 1).reshape(-1, 4)
        truths.append((bx, ~np.asarray(t["inside"], bool)[sel]))
    box = evaluate_boxes(predictions, truths, iou=iou, score_threshold=score_threshold)
    box.pop("matches")
    # position-based: detections above the threshold vs the truth catalogue
    rows = {"k": [], "x": [], "y": [], "flux_r": []}
    for i, (b, s) in enumerate(predictions):
        b = np.asarray(b, np.float64).reshape(-1, 4)
        keep = np.asarray(s) >= score_threshold
        b = b[keep]
        rows["k"].append(np.full(len(b), i))
        rows["x"].append((b[:, 0] + b[:, 2]) / 2)
        rows["y"].append((b[:, 1] + b[:, 3]) / 2)
        rows["flux_r"].append(box_flux(fields.images[i, 1], b))
    det = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}
    size, ps = fields.size, fields.pixscale
    edge = edge_arcsec / ps - 0.5
    ra, dec = _sky(det["k"], det["x"], det["y"], size, ps)
    detections = Table({"ra": ra, "dec": dec, "flux_r": det["flux_r"]})
    rra, rdec = _sky(tf, t["x"], t["y"], size, ps)
    reference = Table({"ra": rra, "dec": rdec, "true_mag_r": np.asarray(t["true_mag_r"]),
                       "true_r_half": np.asarray(t["true_r_half"]),
                       "true_class_key": np.asarray(t["true_class_key"]).astype(str),
                       "psfsize_r": np.asarray(t["psfsize_r"])})

    def counted(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return (x >= edge) & (x <= size - 1 - edge) & (y >= edge) & (y <= size - 1 - edge)

    report = compare_catalogs(detections, reference, counted_detections=counted(det["x"], det["y"]),
                              counted_reference=counted(t["x"], t["y"]))
    return {"box": box, "position": report.as_dict(), "position_lines": report.lines()}


def sep_predictions(fields: FieldSet, root: str, *, box_factor: float = 2.5) -> tuple[list, float]:
    """sep (``survey.detect_sources``, the engine's defaults) on the whole bricks the fields come from,
    restricted to each field (detections centred in it). Box: the axis-aligned box of the ellipse of
    semi-axes ``box_factor`` x (a, b) (sep's isophotal second moments; for a Gaussian source 2.5 sigma is
    close to the truth box's 2 x FWHM / 2); score: the detection flux (ranks the detections for AP).
    Returns the per-field predictions and the detection seconds."""
    import time

    from galaxalign_batch.survey import detect_sources, open_tile

    out: list = [None] * len(fields)
    seconds = 0.0
    origin = fields.origin
    for brick in sorted(set(str(b) for b in origin["brick"])):
        tile = open_tile(root, brick)
        t0 = time.perf_counter()
        d = detect_sources(tile)
        seconds += time.perf_counter() - t0
        x, y = np.asarray(d["x"], np.float64), np.asarray(d["y"], np.float64)
        a, b = box_factor * np.asarray(d["a"], np.float64), box_factor * np.asarray(d["b"], np.float64)
        th = np.asarray(d["theta"], np.float64)
        hx = np.sqrt((a * np.cos(th)) ** 2 + (b * np.sin(th)) ** 2)
        hy = np.sqrt((a * np.sin(th)) ** 2 + (b * np.cos(th)) ** 2)
        flux = np.asarray(d["flux"], np.float64)
        for i in np.flatnonzero(np.asarray(origin["brick"]).astype(str) == brick):
            x0, y0, s = int(origin["x0"][i]), int(origin["y0"][i]), fields.size
            sel = (x >= x0 - 0.5) & (x < x0 + s - 0.5) & (y >= y0 - 0.5) & (y < y0 + s - 0.5)
            bx = np.stack([x[sel] - hx[sel] - x0, y[sel] - hy[sel] - y0, x[sel] + hx[sel] - x0,
                           y[sel] + hy[sel] - y0], 1)
            bx = np.clip(bx, -0.5, s - 0.5)
            out[i] = (bx.astype(np.float32), flux[sel].astype(np.float32))
    return out, seconds
