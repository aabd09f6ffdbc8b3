"""Numba kernels: resample every source's footprint, mask, stretch and convert in one pass.

One ``prange`` iteration per source. Along each axis an output pixel has a few *taps* (source pixel
index, weight); the 2-D weight of a tap pair is the product. Weights of one output pixel sum to 1
over the full footprint, including the part outside the image, so the masked weight of a pixel is
the sum of the weights of the taps that fall outside the image or on invalid / non-finite pixels.

Two resampling paths give the same numbers (up to float32 rounding of the intermediate sums):
a fast separable one (rows first, vectorised, then columns) for a source whose window is inside the
image with every pixel valid and finite, and a general per-tap one with masking for the others.
Orientation: the resampling grid has rows along +y and columns along +x of the input; an output
pixel is written where a signed permutation ``M`` (one of the 8 flips / rotations by 90 degrees,
from the WCS) sends it, which is exact because the grid is symmetric about the source. A source whose
WCS is rotated by another angle is resampled on the rotated grid directly (``_resample_rotated``).
See docs/preprocess.md for the conventions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

MODE_NONE = 0  # resampled nanomaggies, channel = band index
MODE_LUPTON = 1  # Legacy Survey viewer RGB (legacypipe sdss_rgb)
MODE_ASINH = 2  # per-band asinh
MODE_GZ = 3  # Galaxy Zoo DECaLS (zooniverse/decals dr2_style_rgb with desaturation)


def taps_per_axis(step: float) -> int:
    """Taps per output pixel along one axis: box footprint for step > 1, bilinear otherwise."""
    return int(math.ceil(step)) + 1 if step > 1.0 else 2


@njit(cache=True, fastmath=False)
def axis_taps(centre, step, n_out, size, idx, wts):
    """Fill ``idx[j, k]`` (source pixel, -1 when outside ``0..size-1``) and ``wts[j, k]``.

    Output pixel ``j`` is centred on ``centre + (j - (n_out - 1) / 2) * step`` (source pixel
    coordinates, pixel ``p`` covering ``[p - 0.5, p + 0.5]``). For ``step > 1`` the weight of pixel
    ``p`` is its overlap with the footprint ``[c - step/2, c + step/2]`` divided by ``step`` (exact
    box filter of the pixelised image); otherwise linear interpolation weights ``1 - |c - p|``.
    Taps are consecutive pixels: ``idx[j, k] = idx[j, 0] + k`` where inside.
    """
    ntaps = idx.shape[1]
    half = (n_out - 1) * 0.5
    if step > 1.0:
        hw = 0.5 * step
        inv = 1.0 / step
        for j in range(n_out):
            c = centre + (j - half) * step
            a = c - hw
            b = c + hw
            p0 = int(math.floor(a + 0.5))
            for k in range(ntaps):
                p = p0 + k
                lo = max(a, p - 0.5)
                hi = min(b, p + 0.5)
                wts[j, k] = (hi - lo) * inv if hi > lo else 0.0
                idx[j, k] = p if (p >= 0 and p < size) else -1
    else:
        for j in range(n_out):
            c = centre + (j - half) * step
            p0 = int(math.floor(c))
            f = c - p0
            wts[j, 0] = 1.0 - f
            wts[j, 1] = f
            idx[j, 0] = p0 if (p0 >= 0 and p0 < size) else -1
            idx[j, 1] = p0 + 1 if (p0 + 1 >= 0 and p0 + 1 < size) else -1


@njit(cache=True, fastmath=False)
def _window_inside(idx):
    """True when every tap of this axis is inside the image."""
    for j in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if idx[j, k] < 0:
                return False
    return True


BLOCK = 16  # side of the blocks of the invalid-pixel map used to pick the fast path


@njit(parallel=True, cache=True, fastmath=False)
def invalid_blocks(valid):
    """(nb, ceil(H/BLOCK), ceil(W/BLOCK)) bool: True where a BLOCK x BLOCK block has an invalid pixel."""
    nb, height, width = valid.shape
    nby = (height + BLOCK - 1) // BLOCK
    nbx = (width + BLOCK - 1) // BLOCK
    out = np.zeros((nb, nby, nbx), np.bool_)
    for t in prange(nb * nby):
        b = t // nby
        by = t % nby
        for row in range(by * BLOCK, min(height, (by + 1) * BLOCK)):
            line = valid[b, row]
            for bx in range(nbx):
                if not out[b, by, bx]:
                    bad = 0
                    for p in range(bx * BLOCK, min(width, (bx + 1) * BLOCK)):
                        bad += not line[p]
                    if bad:
                        out[b, by, bx] = True
    return out


@njit(cache=True, fastmath=False)
def _window_all_valid(valid, blocks, use_blocks, b, row0, row1, col0, col1):
    """True when rows row0..row1, columns col0..col1 of band ``b`` are all valid.

    With ``use_blocks`` the block map answers (conservatively: an invalid pixel in a block the window
    only touches sends the source to the general path, same result); otherwise the window is scanned.
    """
    if use_blocks:
        for by in range(row0 // BLOCK, row1 // BLOCK + 1):
            for bx in range(col0 // BLOCK, col1 // BLOCK + 1):
                if blocks[b, by, bx]:
                    return False
        return True
    for row in range(row0, row1 + 1):
        line = valid[b, row, col0:col1 + 1]
        bad = 0
        for p in range(line.shape[0]):
            bad += not line[p]
        if bad:
            return False
    return True


@njit(cache=True, fastmath=False)
def _resample_fast(image, b, tx_i, tx_w, ty_i, ty_w, vals, present):
    """Separable resampling of band ``b`` (window inside, all valid). False if a sum is not finite."""
    size, ntaps = tx_i.shape
    col0 = tx_i[0, 0]
    ncols = tx_i[size - 1, ntaps - 1] - col0 + 1
    rowsum = np.empty(ncols, np.float32)
    for i in range(size):
        for p in range(ncols):
            rowsum[p] = 0.0
        for l in range(ntaps):
            wy = np.float32(ty_w[i, l])
            line = image[b, ty_i[i, l], col0:col0 + ncols]
            for p in range(ncols):
                rowsum[p] += wy * line[p]
        for j in range(size):
            base = tx_i[j, 0] - col0
            acc = 0.0
            for k in range(ntaps):
                acc += tx_w[j, k] * rowsum[base + k]
            if not math.isfinite(acc):
                return False
            vals[b, i, j] = acc
            present[b, i, j] = True
    return True


@njit(cache=True, fastmath=False)
def _resample_general(image, valid, has_valid, b, tx_i, tx_w, ty_i, ty_w, vals, present):
    """Per-tap resampling of band ``b`` with masking; returns the summed masked weight."""
    size, ntaps = tx_i.shape
    masked_sum = 0.0
    for i in range(size):
        for j in range(size):
            num = 0.0
            wvalid = 0.0
            wmasked = 0.0
            for l in range(ntaps):
                wy = ty_w[i, l]
                row = ty_i[i, l]
                for k in range(ntaps):
                    w = wy * tx_w[j, k]
                    col = tx_i[j, k]
                    if row < 0 or col < 0:
                        wmasked += w
                        continue
                    v = image[b, row, col]
                    if (has_valid and not valid[b, row, col]) or not math.isfinite(v):
                        wmasked += w
                        continue
                    num += w * v
                    wvalid += w
            masked_sum += wmasked
            if wvalid > 0.0:
                vals[b, i, j] = num / wvalid
                present[b, i, j] = True
            else:
                vals[b, i, j] = 0.0
                present[b, i, j] = False
    return masked_sum


@njit(cache=True, fastmath=False, inline="always")
def _put(out, n, c, i, j, v, to_uint8):
    """Store a float32 value; for uint8 outputs floor(v * 255 + 0.5) computed in float64."""
    if to_uint8:
        out[n, c, i, j] = math.floor(np.float64(v) * 255.0 + 0.5)
    else:
        out[n, c, i, j] = v


@njit(cache=True, fastmath=False, inline="always")
def _clip01(v):
    zero = np.float32(0.0)
    one = np.float32(1.0)
    return zero if v < zero else (one if v > one else v)


@njit(cache=True, fastmath=False, inline="always")
def _asinh(x):
    """float32 asinh via log and sqrt (about 4x faster than libm asinh in float64); odd function."""
    ax = abs(x)
    r = math.log(ax + math.sqrt(ax * ax + np.float32(1.0)))
    return -r if x < np.float32(0.0) else r


@njit(cache=True, fastmath=False)
def _lupton_factor(vals, present, i, j, scales, m, q, inv_sqrt_q):
    """asinh(Q I) / sqrt(Q) / I with I the mean over present bands of max(0, f_b s_b + m); 0 when I == 0."""
    zero = np.float32(0.0)
    total = zero
    count = 0
    for b in range(vals.shape[0]):
        if present[b, i, j]:
            total += max(zero, vals[b, i, j] * scales[b] + m)
            count += 1
    if count == 0:
        return zero
    intensity = total / np.float32(count)
    if intensity > zero:
        return _asinh(q * intensity) * inv_sqrt_q / intensity
    return zero


@njit(cache=True, fastmath=False, inline="always")
def _dest(i, j, size, m00, m01, m10, m11):
    """Output (row, column) of grid pixel (i, j): (a, b) = M^T (dx, dy), offsets doubled to stay integers."""
    dx = 2 * j - (size - 1)
    dy = 2 * i - (size - 1)
    a = m00 * dx + m10 * dy
    b = m01 * dx + m11 * dy
    return (b + size - 1) // 2, (a + size - 1) // 2


@njit(cache=True, fastmath=False)
def _gz_pixel(vals, present, i, j, inv_scales, lo, inv_range, desaturate, norm):
    """Galaxy Zoo DECaLS value of each present band at (i, j) into ``norm``, before clipping.

    n_b = (asinh(f_b / scale_b) - asinh(min)) / (asinh(max) - asinh(min)); with desaturation, a = mean of
    the present n_b (1 where it is 0), w = sin((1 - min(1, max_b n_b / a / 2.5)) pi / 2) and
    n_b <- n_b w + a (1 - w) + a (1 - w)^2 n_b: pixels dominated by one band are pulled towards grey.
    """
    f32 = np.float32
    nb = vals.shape[0]
    total = f32(0.0)
    count = 0
    for b in range(nb):
        if present[b, i, j]:
            norm[b] = (_asinh(vals[b, i, j] * inv_scales[b]) - lo) * inv_range
            total += norm[b]
            count += 1
    if not desaturate or count == 0:
        return
    a = total / f32(count)
    if a == f32(0.0):
        a = f32(1.0)
    top = f32(-np.inf)
    for b in range(nb):
        if present[b, i, j]:
            top = max(top, norm[b] / a / f32(2.5))
    wt = f32(1.0) - min(top, f32(1.0))
    wt = f32(math.sin(wt * f32(math.pi / 2.0)))
    rest = f32(1.0) - wt
    for b in range(nb):
        if present[b, i, j]:
            norm[b] = norm[b] * wt + a * rest + a * rest * rest * norm[b]


@njit(cache=True, fastmath=False)
def _stretch(out, n, vals, present, mode, planes, p1, p2, m, q, fill, to_uint8, orient):
    """Stretch the resampled float32 values ``vals`` (nb, S, S) of source ``n`` into ``out``.

    legacypipe sdss_rgb (lupton): I = mean_b max(0, f_b s_b + m); plane_b = clip((f_b s_b + m) asinh(Q I) / sqrt(Q) / I).
    asinh: plane_b = clip(asinh(f_b / softening_b) / asinh(max_b / softening_b)); p2 holds the denominator.
    gz-decals: see ``_gz_pixel``; ``m``, ``q`` hold asinh(min), 1 / (asinh(max) - asinh(min)), ``p2[0]`` > 0
    turns desaturation on. Computed in float32, like legacypipe on float32 images. Grid pixel (i, j)
    goes to ``_dest(i, j, S, *orient)``.
    """
    nb, size = vals.shape[0], vals.shape[1]
    f32 = np.float32
    fill32 = f32(fill)
    m00, m01, m10, m11 = orient[0], orient[1], orient[2], orient[3]
    if mode == MODE_NONE:
        for b in range(nb):
            for i in range(size):
                for j in range(size):
                    oi, oj = _dest(i, j, size, m00, m01, m10, m11)
                    _put(out, n, b, oi, oj, vals[b, i, j] if present[b, i, j] else fill32, to_uint8)
        return
    scales = p1.astype(np.float32)
    inv_scales = (1.0 / p1).astype(np.float32)
    inv_denom = (1.0 / p2).astype(np.float32)
    m32 = f32(m)
    q32 = f32(q)
    inv_sqrt_q = f32(1.0 / math.sqrt(q)) if mode == MODE_LUPTON else f32(1.0)
    desaturate = p2[0] > 0.0
    factor = np.empty(size, np.float32)
    norm = np.empty(nb, np.float32)
    for i in range(size):
        if mode == MODE_LUPTON:
            for j in range(size):
                factor[j] = _lupton_factor(vals, present, i, j, scales, m32, q32, inv_sqrt_q)
        for j in range(size):
            oi, oj = _dest(i, j, size, m00, m01, m10, m11)
            if mode == MODE_GZ:
                _gz_pixel(vals, present, i, j, inv_scales, m32, q32, desaturate, norm)
            for b in range(nb):
                c = planes[b]
                if not present[b, i, j]:
                    v = fill32
                elif mode == MODE_LUPTON:
                    v = _clip01((vals[b, i, j] * scales[b] + m32) * factor[j])
                elif mode == MODE_GZ:
                    v = _clip01(norm[b])
                else:
                    v = _clip01(_asinh(vals[b, i, j] * inv_scales[b]) * inv_denom[b])
                _put(out, n, c, oi, oj, v, to_uint8)


@njit(cache=True, fastmath=False)
def _resample_rotated(image, valid, has_valid, b, x, y, rot, step, vals, present):
    """Band ``b`` on a grid rotated by ``rot`` (input pixels per output pixel, 2 x 2), in output order.

    Output pixel (i, j) is centred on (x, y) + rot (j - h, i - h), h = (S - 1) / 2. For step > 1 its
    footprint (the image of the output pixel square) is sampled at ``ss`` x ``ss`` points, each taking
    the pixel it falls in (the pixelised image, as the box filter): a Riemann sum of the same area
    average the separable path computes exactly. For step <= 1, bilinear at the centre. Masked taps
    are left out and the rest renormalised, as in ``_resample_general``; returns the masked weight.
    """
    nb, height, width = image.shape
    size = vals.shape[1]
    half = (size - 1) * 0.5
    masked_sum = 0.0
    ss = max(2, int(math.ceil(4.0 * step))) if step > 1.0 else 1
    inv_ss = 1.0 / ss
    wsub = inv_ss * inv_ss
    for i in range(size):
        for j in range(size):
            num = 0.0
            wvalid = 0.0
            wmasked = 0.0
            for su in range(ss):
                u = j - half + ((su + 0.5) * inv_ss - 0.5 if ss > 1 else 0.0)
                for sv in range(ss):
                    v = i - half + ((sv + 0.5) * inv_ss - 0.5 if ss > 1 else 0.0)
                    px = x + rot[0, 0] * u + rot[0, 1] * v
                    py = y + rot[1, 0] * u + rot[1, 1] * v
                    if ss > 1:
                        col = int(math.floor(px + 0.5))
                        row = int(math.floor(py + 0.5))
                        if row < 0 or col < 0 or row >= height or col >= width:
                            wmasked += wsub
                            continue
                        val = image[b, row, col]
                        if (has_valid and not valid[b, row, col]) or not math.isfinite(val):
                            wmasked += wsub
                            continue
                        num += wsub * val
                        wvalid += wsub
                    else:
                        c0 = int(math.floor(px))
                        r0 = int(math.floor(py))
                        fx = px - c0
                        fy = py - r0
                        for dr in range(2):
                            wy = fy if dr else 1.0 - fy
                            for dc in range(2):
                                w = wy * (fx if dc else 1.0 - fx)
                                row = r0 + dr
                                col = c0 + dc
                                if row < 0 or col < 0 or row >= height or col >= width:
                                    wmasked += w
                                    continue
                                val = image[b, row, col]
                                if (has_valid and not valid[b, row, col]) or not math.isfinite(val):
                                    wmasked += w
                                    continue
                                num += w * val
                                wvalid += w
            masked_sum += wmasked
            if wvalid > 0.0:
                vals[b, i, j] = num / wvalid
                present[b, i, j] = True
            else:
                vals[b, i, j] = 0.0
                present[b, i, j] = False
    return masked_sum


@njit(parallel=True, cache=True, fastmath=False)
def cutout_kernel(image, valid, has_valid, blocks, use_blocks, xs, ys, order, step, ntaps, mode, planes, p1, p2, m, q, fill,
                  to_uint8, orient, rotated, rot, out, masked):
    """Cutouts of all sources into ``out`` (N, 3, S, S) (zeroed by the caller) and ``masked`` (N,).

    ``blocks`` is ``invalid_blocks(valid)`` when ``use_blocks`` (worth it when the sources' windows
    add up to more than the image), else unused and the windows are scanned. Sources are visited in
    ``order`` (sorted by row for cache locality); results go to their own index. ``orient`` (N, 4):
    the signed permutation M (m00, m01, m10, m11) of each source; where ``rotated[n]`` the source is
    resampled on the grid ``rot[n]`` (2 x 2, input pixels per output pixel) instead.
    """
    nb, height, width = image.shape
    size = out.shape[2]
    reach = 0.7072 * size * step + 2.0
    inv_count = 1.0 / (nb * size * size)
    identity = np.array([1, 0, 0, 1], np.int64)
    for t in prange(order.shape[0]):
        n = order[t]
        x = xs[n]
        y = ys[n]
        if x + reach < 0.0 or x - reach > width - 1.0 or y + reach < 0.0 or y - reach > height - 1.0:
            for b in range(nb):  # footprint entirely off the image
                c = b if mode == MODE_NONE else planes[b]
                for i in range(size):
                    for j in range(size):
                        _put(out, n, c, i, j, np.float32(fill), to_uint8)
            masked[n] = 1.0
            continue
        vals = np.empty((nb, size, size), np.float32)
        present = np.empty((nb, size, size), np.bool_)
        masked_sum = 0.0
        if rotated[n]:
            for b in range(nb):
                masked_sum += _resample_rotated(image, valid, has_valid, b, x, y, rot[n], step, vals, present)
            _stretch(out, n, vals, present, mode, planes, p1, p2, m, q, fill, to_uint8, identity)
            masked[n] = min(1.0, masked_sum * inv_count)
            continue
        tx_i = np.empty((size, ntaps), np.int64)
        tx_w = np.empty((size, ntaps), np.float64)
        ty_i = np.empty((size, ntaps), np.int64)
        ty_w = np.empty((size, ntaps), np.float64)
        axis_taps(x, step, size, width, tx_i, tx_w)
        axis_taps(y, step, size, height, ty_i, ty_w)
        inside = _window_inside(tx_i) and _window_inside(ty_i)
        for b in range(nb):
            fast = inside and (not has_valid or _window_all_valid(
                valid, blocks, use_blocks, b, ty_i[0, 0], ty_i[size - 1, ntaps - 1], tx_i[0, 0], tx_i[size - 1, ntaps - 1]))
            if not (fast and _resample_fast(image, b, tx_i, tx_w, ty_i, ty_w, vals, present)):
                masked_sum += _resample_general(image, valid, has_valid, b, tx_i, tx_w, ty_i, ty_w, vals, present)
        _stretch(out, n, vals, present, mode, planes, p1, p2, m, q, fill, to_uint8, orient[n])
        masked[n] = min(1.0, masked_sum * inv_count)
