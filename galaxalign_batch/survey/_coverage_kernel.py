"""The coverage rule's per-pixel pass, compiled (Numba): one read of a band's image (and invvar) planes
and one write of the output planes and the validity mask, instead of NumPy's chain of full-size
temporaries (``isfinite``, ``~finite``, ``invvar > 0``, masked assignments: about 0.3 s and several
hundred MB of fresh pages per 3600-px, 3-band brick). The rule itself is
:func:`galaxalign_batch.survey.tile.coverage_planes`; this module only holds its inner loop.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=False)
def coverage_band(src, src_iv, out, out_iv, valid, has_iv):  # pragma: no cover - compiled
    """Per pixel: the value as float32; valid = finite (and, with ``has_iv``, a finite invvar > 0);
    ``out``/``out_iv`` = the value where valid, else 0. ``out`` may be ``src`` (in place).

    Returns (finite pixels, valid pixels, valid pixels whose value is exactly 0).
    """
    h, w = src.shape
    n_finite = 0
    n_valid = 0
    n_zero = 0
    for y in range(h):
        for x in range(w):
            v = np.float32(src[y, x])
            ok = np.isfinite(v)
            n_finite += ok
            if has_iv:
                iv = np.float32(src_iv[y, x])
                ok = ok and np.isfinite(iv) and iv > 0
                out_iv[y, x] = iv if ok else np.float32(0.0)
            out[y, x] = v if ok else np.float32(0.0)
            valid[y, x] = ok
            n_valid += ok
            n_zero += ok and v == 0
    return n_finite, n_valid, n_zero


@njit(cache=True, nogil=True)
def _find(parent, i):  # pragma: no cover - compiled
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@njit(cache=True, nogil=True)
def zero_regions_band(img, min_pixels, out):  # pragma: no cover - compiled
    """``out`` = True on exact zeros of ``img`` in a 4-connected region of at least ``min_pixels``
    zeros; returns how many pixels that is. Connected components of *runs* of zeros (union-find over
    the runs of consecutive rows that overlap), so memory and time follow the number of runs, not the
    image size, beyond one read of the image: the runs are counted first, then stored and joined.
    """
    h, w = img.shape
    n = 0
    for y in range(h):
        inside = False
        for x in range(w):
            z = img[y, x] == 0
            if z and not inside:
                n += 1
            inside = z
    out[:, :] = False
    if n == 0:
        return 0
    row = np.empty(n, np.int32)
    start = np.empty(n, np.int32)
    stop = np.empty(n, np.int32)
    parent = np.empty(n, np.int32)
    k = 0
    prev_first = 0  # runs of the previous row: [prev_first, prev_end)
    prev_end = 0
    for y in range(h):
        first = k
        x = 0
        while x < w:
            if img[y, x] == 0:
                s = x
                while x < w and img[y, x] == 0:
                    x += 1
                row[k] = y
                start[k] = s
                stop[k] = x
                parent[k] = k
                k += 1
            else:
                x += 1
        # join with the overlapping runs of the row above (both lists sorted by start)
        if y > 0:
            j = prev_first
            for i in range(first, k):
                while j < prev_end and stop[j] <= start[i]:
                    j += 1
                jj = j
                while jj < prev_end and start[jj] < stop[i]:
                    a = _find(parent, i)
                    b = _find(parent, jj)
                    if a != b:
                        if a < b:
                            parent[b] = a
                        else:
                            parent[a] = b
                    jj += 1
        prev_first = first
        prev_end = k
    size = np.zeros(n, np.int64)
    for i in range(n):
        size[_find(parent, i)] += stop[i] - start[i]
    total = 0
    for i in range(n):
        if size[_find(parent, i)] >= min_pixels:
            out[row[i], start[i]:stop[i]] = True
            total += stop[i] - start[i]
    return total
