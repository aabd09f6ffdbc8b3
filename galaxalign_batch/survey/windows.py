"""Overlapping windows over a tile and its whole-tile noise: the shared tiling of the heads that work on
pixels (``restoration.tiles`` restores windows, ``detection.apply`` detects in them).

A tile of ``n`` px is covered by windows of ``window`` px; each window keeps its **core** (the window
less ``margin`` px on every inner border, the tile's edges included); the cores tile the image with
neither gap nor overlap.
"""

from __future__ import annotations

import numpy as np

from galaxalign_batch.errors import ConfigError


def window_starts(n: int, window: int, margin: int) -> list[int]:
    """First pixels of windows of ``window`` px covering ``0..n`` so that consecutive cores
    (``margin`` px in from each inner border) meet; the last window ends at ``n``."""
    if n <= window:
        return [0]
    step = window - 2 * margin
    if step < 1:
        raise ConfigError(f"--window {window} must be larger than twice the margin {margin}")
    starts = list(range(0, n - window, step))
    starts.append(n - window)
    return sorted(set(starts))


def _core(start: int, size: int, n: int, margin: int, prev_end: int) -> tuple[int, int]:
    """[a, b) of the pixels a window at ``start`` keeps: from where the previous core ended (or the
    tile's edge) to ``margin`` before its end (or the tile's edge)."""
    b = n if start + size >= n else start + size - margin
    return prev_end, max(prev_end, b)


def window_jobs(h: int, w: int, win_y: int, win_x: int, margin: int) -> list[tuple[int, int, int, int, int, int]]:
    """``(y0, x0, ya, yb, xa, xb)`` of every window of an ``h x w`` image: its first pixel and its core."""
    jobs, prev_y = [], 0
    for y0 in window_starts(h, win_y, margin):
        ya, yb = _core(y0, win_y, h, margin, prev_y)
        prev_y, prev_x = yb, 0
        for x0 in window_starts(w, win_x, margin):
            xa, xb = _core(x0, win_x, w, margin, prev_x)
            prev_x = xb
            if yb > ya and xb > xa:
                jobs.append((y0, x0, ya, yb, xa, xb))
    return jobs


def wavelet_sigma(planes: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Per-plane noise of ``planes`` (B, H, W) from the box around their covered pixels (scikit-image's
    wavelet estimate); ``covered`` is (H, W) for every plane or (B, H, W). NaN for a plane without coverage."""
    from skimage.restoration import estimate_sigma

    covered = np.asarray(covered, bool)
    out = []
    for i, plane in enumerate(planes):
        ok = covered[i] if covered.ndim == 3 else covered
        rows, cols = np.flatnonzero(ok.any(axis=1)), np.flatnonzero(ok.any(axis=0))
        if not len(rows):
            out.append(np.nan)
            continue
        out.append(float(estimate_sigma(np.asarray(plane)[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])))
    return np.asarray(out, np.float64)
