"""Box metrics for the detectors: IoU matching, precision / recall / F1 and AP at an IoU threshold.

Matching (per field, as PASCAL VOC): detections are taken in order of decreasing score; each is
matched to the unmatched truth box of highest IoU with it, if that IoU is at least ``iou`` (0.5).
A truth box flagged *ignore* (a source centred outside the field, see ``fields``) can be matched
but then the detection counts neither as a true nor as a false positive, and ignored boxes are not
in the recall's denominator.

AP is the VOC 2010+ all-point interpolated area under the precision-recall curve (precision made
monotone from the right, summed over the recall steps). P, R and F1 are at a score threshold.
"""

from __future__ import annotations

import numpy as np

from galaxalign_batch.errors import ConfigError


def box_iou(a, b) -> np.ndarray:
    """IoU (n, m) of boxes ``a`` (n, 4) and ``b`` (m, 4) as ``x0, y0, x1, y1`` (continuous edges)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    if np.any(a[:, 2] < a[:, 0]) or np.any(a[:, 3] < a[:, 1]) or np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
        raise ConfigError("boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(det, scores, truth, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching in one field. Returns per detection its truth index (-1: none) and per
    truth box its detection index (-1: missed); see the module docstring."""
    det = np.asarray(det, np.float64).reshape(-1, 4)
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(scores) != len(det):
        raise ConfigError(f"{len(det)} boxes but {len(scores)} scores")
    d2t = np.full(len(det), -1, np.int64)
    t2d = np.full(len(truth), -1, np.int64)
    if not len(det) or not len(truth):
        return d2t, t2d
    ious = box_iou(det, truth)
    for d in np.argsort(-scores, kind="stable"):
        cand = np.where(t2d < 0, ious[d], -1.0)
        t = int(np.argmax(cand))
        if cand[t] >= iou:
            d2t[d], t2d[t] = t, d
    return d2t, t2d


def average_precision(tp: np.ndarray, scores: np.ndarray, n_truth: int) -> float:
    """All-point interpolated AP of detections flagged ``tp`` (True / False), ranked by ``scores``."""
    if n_truth <= 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.asarray(tp, bool)[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / n_truth
    precision = ctp / np.maximum(ctp + cfp, 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def evaluate_boxes(detections: list[tuple[np.ndarray, np.ndarray]], truths: list[tuple[np.ndarray, np.ndarray]],
                   *, iou: float = 0.5, score_threshold: float = 0.0) -> dict:
    """P, R, F1 (detections with score >= ``score_threshold``) and AP (all detections) over fields.

    ``detections``: per field ``(boxes (n, 4), scores (n,))``; ``truths``: per field ``(boxes (m, 4),
    ignore (m,) bool)``. Also returns per field the matches (``d2t``, ``t2d``) for further statistics.
    """
    if len(detections) != len(truths):
        raise ConfigError(f"{len(detections)} fields of detections but {len(truths)} of truth")
    all_tp, all_scores, counted_det = [], [], []
    n_truth = 0
    matches = []
    for (boxes, scores), (tboxes, ignore) in zip(detections, truths):
        ignore = np.zeros(len(tboxes), bool) if ignore is None else np.asarray(ignore, bool)
        d2t, t2d = match_boxes(boxes, scores, tboxes, iou)
        matches.append((d2t, t2d))
        hit_ignored = np.zeros(len(d2t), bool)
        hit_ignored[d2t >= 0] = ignore[d2t[d2t >= 0]]
        all_tp.append((d2t >= 0) & ~hit_ignored)
        all_scores.append(np.asarray(scores, np.float64).reshape(-1))
        counted_det.append(~hit_ignored)
        n_truth += int((~ignore).sum())
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    sc = np.concatenate(all_scores) if all_scores else np.zeros(0)
    counted = np.concatenate(counted_det) if counted_det else np.zeros(0, bool)
    ap = average_precision(tp[counted], sc[counted], n_truth)
    sel = counted & (sc >= score_threshold)
    n_tp = int(tp[sel].sum())
    n_det = int(sel.sum())
    precision = n_tp / n_det if n_det else float("nan")
    recall = n_tp / n_truth if n_truth else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if n_det and n_truth and (precision + recall) > 0 else 0.0
    return {"iou": iou, "score_threshold": score_threshold, "n_truth": n_truth, "n_detections": n_det,
            "true_positives": n_tp, "precision": precision, "recall": recall, "f1": f1, "ap": ap,
            "matches": matches}
