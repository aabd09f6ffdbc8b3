"""`restore`: the denoising head applied to whole survey tiles, written as FITS cubes.

A tile (a Legacy Survey brick, 3600 px a side, or a viewer cutout cube) is far larger than the
stamps the head was trained on, and a head with foundation features takes the encoder's tokens of a
cutout *centred on its stamp*. So a tile is restored in overlapping **windows** of ``window`` px
(default 128, the training stamps' size), each denoised as one stamp (its own centre for the
encoder's cutout), and only each window's core (the window less ``margin`` px on every side that
is not a tile edge) is kept: every output pixel comes from a window in which it lies at least
``margin`` px from the window's border (or at the tile's own edge).

Noise: the head needs each stamp's per-band noise sigma (nanomaggies per pixel). With an inverse
variance map (bricks) it is the median of ``1 / sqrt(invvar)`` over the window's covered pixels;
without one (viewer cubes) one value per band for the whole tile, scikit-image's wavelet estimate
(``estimate_sigma``) over the tile's covered region.

Pixels without coverage are given to the head as 0 and written as NaN. The output is a cube
``(3, H, W)`` float32 in nanomaggies with the tile's WCS and ``BANDS = 'grz'``, which ``embed``,
``cutout`` and :func:`galaxalign_batch.survey.open_tile` read like any cutout cube.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError, GalaxAlignError
from galaxalign_batch.survey.windows import wavelet_sigma, window_jobs, window_starts

log = logging.getLogger(__name__)

__all__ = ["restore_tile", "restore_tiles", "window_starts", "RestoreSummary", "HEAD_BANDS"]

HEAD_BANDS = ("g", "r", "z")
SUFFIX = "-restored.fits"


def restore_tile(head, tile, *, window: int = 128, margin: int = 16, batch_size: int = 16,
                 precision: str = "fp32") -> tuple[np.ndarray, dict]:
    """The restored ``(3, H, W)`` float32 image of ``tile`` (NaN without coverage) and what was done
    (``precision``: the head's forward passes, resolved fp32 or bf16; :func:`~galaxalign_batch.restoration.head.denoise`)."""
    from galaxalign_batch.restoration.head import denoise

    missing = [b for b in HEAD_BANDS if b not in tile.bands]
    if missing:
        raise ConfigError(f"{tile.path}: the tile has bands {''.join(tile.bands)}; the denoising head needs "
                          f"{''.join(HEAD_BANDS)} (missing {''.join(missing)})")
    if head.config.bands != len(HEAD_BANDS):
        raise ConfigError(f"the head takes {head.config.bands} band(s); restore handles g, r, z heads")
    idx = [tile.bands.index(b) for b in HEAD_BANDS]
    image = np.ascontiguousarray(tile.image[idx], np.float32)
    valid = tile.valid[idx]
    image = np.where(valid, image, 0.0).astype(np.float32)
    _, h, w = image.shape
    if min(h, w) < 8:
        raise ConfigError(f"{tile.path}: a {w} x {h} px tile is too small to restore (at least 8 x 8)")
    ratio = tile.pixscale / head.config.pixscale
    if abs(ratio - 1) > 0.05:
        log.warning("%s: %.3g\"/px, the head was trained at %.3g\"/px: the U-Net sees structure at another scale",
                    tile.path, tile.pixscale, head.config.pixscale)
    invvar = tile.invvar[idx] if tile.invvar is not None else None
    whole = None if invvar is not None else wavelet_sigma(tile.image[idx], tile.valid[idx])
    if whole is not None and not np.all(np.isfinite(whole) & (whole > 0)):
        raise ConfigError(f"{tile.path}: cannot estimate the noise of band(s) "
                          f"{''.join(b for b, s in zip(HEAD_BANDS, whole) if not (np.isfinite(s) and s > 0))}")
    win_y, win_x = min(window, h), min(window, w)
    out = np.full((3, h, w), np.nan, np.float32)
    jobs = window_jobs(h, w, win_y, win_x, margin)  # (y0, x0, core y range, core x range)
    sig_used = []
    from galaxalign_batch.progress import bar

    for k in bar(range(0, len(jobs), batch_size), total=-(-len(jobs) // batch_size), desc=f"restoring {tile.name}",
                 unit="batch"):
        part = jobs[k:k + batch_size]
        stamps = np.stack([image[:, y0:y0 + win_y, x0:x0 + win_x] for y0, x0, *_ in part])
        sig = np.empty((len(part), 3), np.float64)
        for j, (y0, x0, *_) in enumerate(part):
            if invvar is None:
                sig[j] = whole
                continue
            iv = invvar[:, y0:y0 + win_y, x0:x0 + win_x]
            for b in range(3):
                good = iv[b][(iv[b] > 0) & np.isfinite(iv[b])]
                sig[j, b] = float(np.median(1.0 / np.sqrt(good))) if len(good) else np.nan
        # a window without inverse variance in a band (no coverage there): the tile's median for that band
        bad = ~np.isfinite(sig)
        if bad.any():
            fallback = _median_sigma(invvar)
            sig[bad] = np.broadcast_to(fallback, sig.shape)[bad]
        sig_used.append(sig)
        restored = denoise(head, stamps, sig, batch_size=batch_size, pixscale=tile.pixscale, precision=precision)
        for j, (y0, x0, ya, yb, xa, xb) in enumerate(part):
            out[:, ya:yb, xa:xb] = restored[j][:, ya - y0:yb - y0, xa - x0:xb - x0]
    out[~valid] = np.nan
    sig_all = np.concatenate(sig_used) if sig_used else np.zeros((0, 3))
    info = {"windows": len(jobs), "window": [win_y, win_x], "margin": margin,
            "sigma": "invvar (per window, median 1/sqrt(invvar))" if invvar is not None else "wavelet estimate (tile)",
            "sigma_median": [float(v) for v in np.median(sig_all, axis=0)] if len(sig_all) else None}
    return out, info


def _median_sigma(invvar: np.ndarray | None) -> np.ndarray:
    s = np.full(3, np.nan)
    if invvar is None:
        return s
    for b in range(3):
        good = invvar[b][(invvar[b] > 0) & np.isfinite(invvar[b])]
        if len(good):
            s[b] = float(np.median(1.0 / np.sqrt(good)))
    if not np.all(np.isfinite(s)):
        raise ConfigError("the tile has no inverse variance in some band: nothing to normalise the noise by")
    return s


@dataclass
class RestoreSummary:
    out: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)  # outputs of another head, window or margin, written again
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    precision: str = "fp32"

    def lines(self) -> list[str]:
        out = [f"restored {len(self.written)} tile(s) into {self.out} in {self.seconds:.1f} s ({self.precision})"
               + (f"; {len(self.skipped)} already there (--force redoes them)" if self.skipped else "")
               + (f"; {len(self.redone)} of them again: made by another head, window or margin" if self.redone
                  else "")]
        out += [f"  {p}" for p in self.written]
        if self.failed:
            out.append(f"{len(self.failed)} tile(s) failed:")
            out += [f"  {name}: {why}" for name, why in self.failed]
        return out


def output_name(ref, used: set[str]) -> str:
    """``BRICK-restored.fits`` or ``STEM-restored.fits``; a name already taken gets the tile key's digest."""
    base = ref.brick or Path(ref.path).name.removesuffix(".fz").removesuffix(".gz").removesuffix(".fits")
    name = base + SUFFIX
    if name in used:
        name = f"{base}-{hashlib.sha256(ref.name.encode()).hexdigest()[:8]}{SUFFIX}"
    used.add(name)
    return name


def made_by_other(path: str | os.PathLike, cards: dict) -> str | None:
    """Why the existing output ``path`` is not what this run would write (another head, window, margin or
    tile, as its header says), or None when it is."""
    from astropy.io import fits

    try:
        header = fits.getheader(path)
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    for key in ("HEADSHA", "TILEKEY", "WINREQ", "MARGIN"):
        want = cards[key][0] if isinstance(cards[key], tuple) else cards[key]
        if header.get(key) != want:
            return f"{key} {header.get(key)!r}, this run {want!r}"
    return None


def write_cube(path: str | os.PathLike, data: np.ndarray, tile, cards: dict) -> None:
    """``data`` (3, H, W) as a cutout cube with ``tile``'s WCS, written atomically."""
    from astropy.io import fits

    header = tile.wcs.to_header()
    header["BANDS"] = ("".join(HEAD_BANDS), "planes")
    for i, b in enumerate(HEAD_BANDS):
        header[f"BAND{i}"] = b
    header["BUNIT"] = ("nanomaggy", "restored surface brightness per pixel")
    for k, v in cards.items():
        header[k] = v
    with atomic.replacing(path) as tmp:
        fits.PrimaryHDU(np.asarray(data, np.float32), header=header).writeto(tmp, overwrite=True)


def restore_tiles(tiles: Sequence[str], head_path: str | os.PathLike, out: str | os.PathLike, *,
                  bricks: Sequence[str] | None = None, device: str = "cpu", window: int = 128, margin: int = 16,
                  batch_size: int = 16, force: bool = False, force_unlock: bool = False,
                  precision: str = "auto") -> RestoreSummary:
    """Restore every tile of ``tiles`` (as ``--tiles`` resolves them) with the head at ``head_path`` into ``out``.

    ``precision``: ``auto`` (bf16 where ``device`` runs it natively, else fp32), ``fp32`` or ``bf16``; recorded
    in each output's ``PRECISN`` card (an output of another precision is not restored again: the two differ by
    a few thousandths of the noise, docs/restoration.md).

    A tile whose output exists, made by this head file with this window and margin (its header's
    ``HEADSHA``, ``WINREQ``, ``MARGIN``, ``TILEKEY``), is skipped (``force`` redoes it); one made otherwise is
    restored again. A tile that cannot be read or restored is reported in the summary and the others go
    on. The run holds ``out``'s lease (:mod:`galaxalign_batch.lease`): one restore per folder at a time.
    """
    from galaxalign_batch.model.precision import resolve_precision
    from galaxalign_batch.model.spec import file_digest
    from galaxalign_batch.restoration.head import load_head, read_head_info
    from galaxalign_batch.survey.tiles import resolve_tiles

    t0 = time.perf_counter()
    if window < 16 or margin < 0 or 2 * margin >= window:
        raise ConfigError(f"--window must be at least 16 px and more than twice the margin, got {window}, {margin}")
    precision = resolve_precision(precision, device)
    head_path = os.fspath(head_path)
    if not os.path.isfile(head_path):
        raise ConfigError(f"{head_path}: no such denoising head file")
    read_head_info(head_path)  # a clear error for a file that is no head, before the tiles are listed
    refs = resolve_tiles(list(tiles), bricks)
    if not refs:
        raise ConfigError(f"--tiles {' '.join(tiles)}: no tiles found")
    head = load_head(head_path, device=device)
    digest = file_digest(head_path)
    trained = head.training_settings or {}
    log.info("denoising head %s: trained on %s noise%s", head_path, trained.get("noise", "an unrecorded"),
             f" ({trained['steps']} steps)" if "steps" in trained else "")
    with lease.locked(out, force=force_unlock):
        return _restore(refs, head, digest, out, window=window, margin=margin, batch_size=batch_size, force=force,
                        t0=t0, precision=precision)


def _restore(refs, head, digest: str, out, *, window: int, margin: int, batch_size: int, force: bool,
             t0: float, precision: str = "fp32") -> RestoreSummary:
    from galaxalign_batch.survey import open_tile

    os.makedirs(out, exist_ok=True)
    atomic.remove_partials(out)  # of a run killed while writing (we hold the lease)
    summary = RestoreSummary(os.fspath(out), precision=precision)
    used: set[str] = set()
    for ref in refs:
        dest = os.path.join(out, output_name(ref, used))
        cards = {"RESTORED": ("galaxalign-batch restore", "denoising head"),
                 "HEADSHA": (digest, "sha256[:16] of the head file"), "TILEKEY": ref.name[-68:],
                 "WINREQ": (window, "px, --window"), "MARGIN": (margin, "px")}
        if os.path.exists(dest) and not force:
            why = made_by_other(dest, cards)
            if why is None:
                summary.skipped.append(dest)
                continue
            log.info("%s: made by another run (%s): restoring it again", dest, why)
            summary.redone.append(dest)
        try:
            if str(ref.path).lower().endswith((".png", ".jpg", ".jpeg")):
                raise ConfigError("a picture has no calibrated flux: restore takes FITS tiles")
            tile = open_tile(ref.path, ref.brick)
            data, info = restore_tile(head, tile, window=window, margin=margin, batch_size=batch_size,
                                      precision=precision)
            lease.check_held(out)
            write_cube(dest, data, tile, {**cards, "WINDOW": (info["window"][1], "px, used"),
                                          "SIGMA": info["sigma"][:68],
                                          "PRECISN": (precision, "the head's forward passes (--precision)")})
            summary.written.append(dest)
        except GalaxAlignError as e:
            log.warning("tile %s failed: %s", ref.name, e)
            summary.failed.append((ref.name, " ".join(str(e).split())))
    summary.seconds = time.perf_counter() - t0
    return summary
