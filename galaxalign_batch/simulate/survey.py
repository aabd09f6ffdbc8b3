"""A simulated Legacy Survey: real-grid bricks with galsim galaxies and stars, written in the DR9 layout.

Sources are generated per brick *cell* (the brick's unique area) from ``(seed, brickid)``, so a
brick needs only its own seed and its neighbours' cells to render: bricks are independent and can
be made in parallel, and a source in the overlap of two full-size bricks is the same galaxy in both
(drawn from its own seed), with ``brick_primary`` true only in the brick whose cell holds it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.progress import bar
from galaxalign_batch.simulate import fitsout
from galaxalign_batch.simulate.galaxies import (GENERATOR_VERSION, MAX_STAMP, auto_stamp, class_keys, draw_model,
                                                MAG_RANGE, draw_star, galaxy_model, star_magnitude)
from galaxalign_batch.simulate.observing import Conditions, check_bands
from galaxalign_batch.survey import layout

log = logging.getLogger(__name__)

DEFAULT_CENTER = (150.1, 2.2)       # COSMOS field, inside the DECaLS footprint
FULL_BRICK_DEG2 = (layout.BRICK_SIZE * layout.PIXSCALE / 3600.0) ** 2   # 0.0686 deg^2
DEFAULT_DENSITY = 2000.0            # galaxies per full 3600x3600-px brick area
DEFAULT_STARS = 300.0               # stars per full brick area
MIN_SIZE = 32
MAX_MIN_SEP = 10.0                  # arcsec, minimum galaxy separation within a cell (less when dense)
MAG_SLOPE = 0.3                     # survey galaxies: dN/dm ~ 10**(0.3 m) over MAG_RANGE (more faint than bright)
MARGIN = MAX_STAMP // 2 + 8         # px around the image from which sources (light, star masks) are taken
N_PASSES = 3                        # nominal exposures per band; invvar scales with the exposures a pixel got

# DR9 maskbits (legacypipe/bits.py, docs pages/dr9/bitmasks.rst)
MASKBITS = {"NPRIMARY": 0, "BRIGHT": 1, "SATUR_G": 2, "SATUR_R": 3, "SATUR_Z": 4, "ALLMASK_G": 5, "ALLMASK_R": 6,
            "ALLMASK_Z": 7, "WISEM1": 8, "WISEM2": 9, "BAILOUT": 10, "MEDIUM": 11, "GALAXY": 12, "CLUSTER": 13}
ALLMASK_BIT = {"g": 5, "r": 6, "z": 7}


# --- brick choice and source catalogues -----------------------------------------------------------

def choose_bricks(n: int, center=DEFAULT_CENTER) -> list[layout.BrickInfo]:
    """``n`` neighbouring real bricks in a near-square block starting at the brick holding ``center``."""
    if n < 1:
        raise ConfigError(f"--bricks must be at least 1, got {n}")
    ncol = math.ceil(math.sqrt(n))
    first = layout.brick_at(*center)
    out: list[layout.BrickInfo] = []
    for r in range(math.ceil(n / ncol)):
        dec = first.dec + r * layout.ROW_HEIGHT
        if dec > 90:
            break
        row0 = layout.brick_at(center[0], dec)
        for c in range(ncol):
            b = layout.brick_at((row0.ra + c * (row0.ra2 - row0.ra1)) % 360.0, dec)
            if b not in out:
                out.append(b)
    return out[:n]


def _cell_area_deg2(cell: layout.BrickInfo) -> float:
    return (cell.ra2 - cell.ra1) * (math.sin(math.radians(cell.dec2)) - math.sin(math.radians(cell.dec1))) \
        * 180.0 / math.pi


def _dart_throw(rng, n: int, sample, min_sep_deg: float, cos_dec: float) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` positions at least ``min_sep_deg`` apart (sequential rejection on a grid hash)."""
    cell = min_sep_deg
    grid: dict[tuple[int, int], list[int]] = {}
    ra_ok: list[float] = []
    dec_ok: list[float] = []
    tries = 0
    while len(ra_ok) < n and tries < 20 * max(n, 1):
        ras, decs = sample(max(n - len(ra_ok), 16))
        for ra, dec in zip(ras, decs):
            tries += 1
            gx, gy = int(ra * cos_dec / cell), int(dec / cell)
            ok = True
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for j in grid.get((gx + dx, gy + dy), ()):
                        if ((ra - ra_ok[j]) * cos_dec) ** 2 + (dec - dec_ok[j]) ** 2 < min_sep_deg ** 2:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if ok:
                grid.setdefault((gx, gy), []).append(len(ra_ok))
                ra_ok.append(ra)
                dec_ok.append(dec)
                if len(ra_ok) == n:
                    break
    return np.array(ra_ok), np.array(dec_ok)


def cell_sources(cell: layout.BrickInfo, seed: int, density: float, stars: float) -> dict[str, np.ndarray]:
    """The galaxies and stars whose centres lie in ``cell``'s unique area, from ``(seed, brickid)``.

    Galaxy classes are balanced within a cell (``i % 10`` shuffled), r magnitudes follow
    dN/dm ~ 10**(MAG_SLOPE m) over MAG_RANGE; each source gets its own seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, cell.brickid, 1]))
    area = _cell_area_deg2(cell)
    n_gal = int(rng.poisson(density * area / FULL_BRICK_DEG2))
    n_star = int(rng.poisson(stars * area / FULL_BRICK_DEG2))
    s1, s2 = math.sin(math.radians(cell.dec1)), math.sin(math.radians(cell.dec2))

    def sample(k):
        ra = rng.uniform(cell.ra1, cell.ra2, k)
        dec = np.degrees(np.arcsin(np.clip(rng.uniform(s1, s2, k), -1, 1)))
        return ra, dec

    cos_dec = max(math.cos(math.radians(cell.dec)), 1e-3)
    spacing = math.sqrt(area * 3600.0 ** 2 / max(n_gal, 1))
    min_sep = min(MAX_MIN_SEP, 0.5 * spacing) / 3600.0
    gra, gdec = _dart_throw(rng, n_gal, sample, min_sep, cos_dec)
    n_gal = len(gra)
    nclass = len(class_keys())
    classes = rng.permutation(np.arange(n_gal) % nclass)
    mags = np.array([star_magnitude(rng, *MAG_RANGE, slope=MAG_SLOPE) for _ in range(n_gal)])
    sra, sdec = sample(n_star)
    n = n_gal + n_star
    return dict(
        ra=np.concatenate([gra, sra]), dec=np.concatenate([gdec, sdec]),
        cls=np.concatenate([classes, np.full(n_star, -1)]).astype(np.int64),
        mag=np.concatenate([mags, np.full(n_star, np.nan)]),
        seed=rng.integers(0, 2 ** 62, n, dtype=np.int64),
        sim_id=cell.brickid * 1_000_000 + np.arange(n, dtype=np.int64),
    )


# --- coverage, noise and masks --------------------------------------------------------------------

def _exposures(rng, size: int, nb: int, no_coverage: float) -> tuple[np.ndarray, list[dict]]:
    """(bands, size, size) number of exposures per pixel: N_PASSES passes with chip gaps, and with
    probability ``no_coverage`` one or two rectangles without any coverage (in all bands or one band)."""
    nexp = np.full((nb, size, size), N_PASSES, dtype=np.int16)
    for b in range(nb):
        for _ in range(N_PASSES):   # DECam-like chip gaps: ~40-px stripes every 2048 (x) / 4096 (y) px
            pass_map = np.zeros((size, size), dtype=bool)
            for axis, period in ((1, 2048), (0, 4096)):
                start = rng.uniform(0, period)
                width = int(rng.integers(30, 50))
                for g in np.arange(start - period * math.ceil(size / period), size, period):
                    lo, hi = int(max(g, 0)), int(min(g + width, size))
                    if lo < hi:
                        if axis == 1:
                            pass_map[:, lo:hi] = True
                        else:
                            pass_map[lo:hi, :] = True
            nexp[b][pass_map] -= 1
    holes = []
    if rng.uniform() < no_coverage:
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(size * f) for f in rng.uniform(0.1, 0.3, 2))
            side = int(rng.integers(0, 4))   # touching one edge, like a survey-footprint boundary
            x0 = int(rng.integers(0, size - w + 1)) if side in (0, 1) else (0 if side == 2 else size - w)
            y0 = int(rng.integers(0, size - h + 1)) if side in (2, 3) else (0 if side == 0 else size - h)
            bands = list(range(nb)) if rng.uniform() < 0.5 else [int(rng.integers(0, nb))]
            for b in bands:
                nexp[b, y0:y0 + h, x0:x0 + w] = 0
            holes.append(dict(x0=x0, y0=y0, width=w, height=h, bands=bands))
    return nexp, holes


def _border_inside(brick: layout.BrickInfo, wcs, x0: int, y0: int, x1: int, y1: int) -> bool:
    """True if every pixel on the border of the box [x0, x1) x [y0, y1) is in the brick's unique area."""
    xs, ys = np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64)
    bx = np.concatenate([xs, xs, np.full(len(ys), x0), np.full(len(ys), x1 - 1)])
    by = np.concatenate([np.full(len(xs), y0), np.full(len(xs), y1 - 1), ys, ys])
    ra, dec = wcs.all_pix2world(bx, by, 0)
    return bool(np.all(brick.contains(ra, dec)))


def _nprimary(brick: layout.BrickInfo, wcs, size: int, band: int = 160) -> np.ndarray:
    """True on pixels outside the brick's unique area (maskbit NPRIMARY).

    The cell is simply connected, so if a box's border lies inside it the whole box does: only the
    pixels outside such a box (a ``band``-px frame at full size) need their sky position computed.
    """
    out = np.zeros((size, size), dtype=bool)
    if _border_inside(brick, wcs, 0, 0, size, size):
        return out
    inner = (band, band, size - band, size - band)
    todo = np.ones((size, size), dtype=bool)
    if size > 2 * band + 2 and _border_inside(brick, wcs, *inner):
        todo[band:size - band, band:size - band] = False
    for y0 in range(0, size, 256):
        rows = todo[y0:y0 + 256]
        yy, xx = np.nonzero(rows)
        if len(yy) == 0:
            continue
        ra, dec = wcs.all_pix2world(xx.astype(np.float64), (yy + y0).astype(np.float64), 0)
        out[yy + y0, xx] = ~brick.contains(ra, dec)
    return out


def star_mask_radius_arcsec(mag):
    """DR9 bright-star mask radius (legacypipe ``mask_radius_for_mag``): 1630" * 1.396**(-mag)."""
    return 1630.0 * 1.396 ** (-np.asarray(mag, dtype=np.float64))


def _disk(mask: np.ndarray, x: float, y: float, r: float) -> None:
    h, w = mask.shape
    x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, w)
    y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    mask[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r


# --- one brick ------------------------------------------------------------------------------------

@dataclass
class BrickJob:
    out: str
    brick: layout.BrickInfo
    size: int
    seed: int
    density: float
    stars: float
    bands: tuple[str, ...]
    no_coverage: float
    max_stamp: int = MAX_STAMP


def _catalog_dtype(bands) -> list[tuple]:
    dt = [("release", ">i2"), ("brickid", ">i4"), ("brickname", "S8"), ("objid", ">i4"), ("brick_primary", "?"),
          ("maskbits", ">i2"), ("ra", ">f8"), ("dec", ">f8"), ("ra_ivar", ">f4"), ("dec_ivar", ">f4"),
          ("bx", ">f4"), ("by", ">f4"), ("type", "S3"), ("ebv", ">f4")]
    for col, t in (("flux", ">f4"), ("flux_ivar", ">f4"), ("mw_transmission", ">f4"), ("nobs", ">i2"),
                   ("psfsize", ">f4"), ("psfdepth", ">f4")):
        dt += [(f"{col}_{b}", t) for b in bands]
    dt += [("shape_r", ">f4"), ("shape_e1", ">f4"), ("shape_e2", ">f4"), ("sersic", ">f4"),
           ("true_class", ">i2"), ("true_class_key", "S24"), ("true_mag_r", ">f4"), ("true_r_half", ">f4"),
           ("true_sersic", ">f4")] + [(f"true_flux_{b}", ">f4") for b in bands] + [("sim_id", ">i8")]
    return dt


def simulate_brick(job: BrickJob) -> dict:
    """Render and write one brick (images, invvar, maskbits, Tractor catalogue); returns its summary."""
    t0 = time.perf_counter()
    brick, size, bands = job.brick, job.size, job.bands
    nb = len(bands)
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, brick.brickid, 2]))
    cond = Conditions.random(rng, bands)
    wcs = layout.brick_wcs(brick, size)

    # sources from this cell and every neighbouring cell that reaches into the image (+ margin)
    corners = np.array([[-MARGIN, -MARGIN], [size + MARGIN, -MARGIN], [-MARGIN, size + MARGIN],
                        [size + MARGIN, size + MARGIN], [size / 2, -MARGIN], [size / 2, size + MARGIN]])
    cra, cdec = wcs.all_pix2world(corners[:, 0], corners[:, 1], 0)
    span = (cra - brick.ra + 180.0) % 360.0 - 180.0 + brick.ra
    cells = layout.bricks_in(float(span.min()) % 360.0, float(span.max()) % 360.0,
                             max(float(cdec.min()), -90.0), min(float(cdec.max()), 90.0))
    parts = [cell_sources(c, job.seed, job.density, job.stars) for c in cells]
    src = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(src["sim_id"], kind="stable")
    src = {k: v[order] for k, v in src.items()}
    sx, sy = wcs.all_world2pix(src["ra"], src["dec"], 0)
    near = (sx > -MARGIN) & (sx < size + MARGIN) & (sy > -MARGIN) & (sy < size + MARGIN)
    src = {k: v[near] for k, v in src.items()}
    sx, sy = sx[near], sy[near]

    nexp, holes = _exposures(rng, size, nb, job.no_coverage)
    sig = cond.sigmas()
    invvar = np.zeros((nb, size, size), dtype=np.float32)
    for b in range(nb):
        invvar[b] = (nexp[b] / N_PASSES) / np.float32(sig[b] ** 2)
    signal = np.zeros((nb, size, size), dtype=np.float32)

    keys = class_keys()
    rows = []
    n_drawn = 0
    # a star's magnitude is the first draw from its seed (see draw_star): known without drawing it
    star_mag = {int(i): star_magnitude(np.random.default_rng(int(src["seed"][i])))
                for i in np.flatnonzero(src["cls"] < 0)}
    with bar(total=len(sx), desc=f"brick {brick.brickname}", unit="src") as pbar:
        for i in range(len(sx)):
            x, y, cls = float(sx[i]), float(sy[i]), int(src["cls"][i])
            srng = np.random.default_rng(int(src["seed"][i]))
            cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
            offset = (x - cx + 0.5, y - cy + 0.5)   # stamps have even sizes: true centre between pixels
            pbar.update(1)
            if cls >= 0:
                model, truth = galaxy_model(keys[cls], srng, mag_r=float(src["mag"][i]))
                half = auto_stamp(truth["extent"], layout.PIXSCALE, job.max_stamp) // 2
                if cx + half <= 0 or cy + half <= 0 or cx - half >= size or cy - half >= size:
                    continue   # its stamp misses the image
                stamp, truth = draw_model(model, truth, psf=cond, bands=bands, offset=offset,
                                          max_stamp=job.max_stamp)
            else:
                if star_mag[i] > 16 and (cx + 32 <= 0 or cy + 32 <= 0 or cx - 32 >= size or cy - 32 >= size):
                    continue
                stamp, truth = draw_star(srng, psf=cond, bands=bands, offset=offset)
            n_drawn += 1
            s = stamp.shape[-1]
            x0, y0 = cx - s // 2, cy - s // 2
            bx0, by0 = max(x0, 0), max(y0, 0)
            bx1, by1 = min(x0 + s, size), min(y0 + s, size)
            if bx0 >= bx1 or by0 >= by1:
                continue
            cut = stamp[:, by0 - y0:by1 - y0, bx0 - x0:bx1 - x0]
            signal[:, by0:by1, bx0:bx1] += cut
            if -0.5 <= x < size - 0.5 and -0.5 <= y < size - 0.5:
                unit = cut / np.maximum([truth[f"flux_{b}"] for b in bands], 1e-30)[:, None, None]
                ivar = np.einsum("bij,bij->b", unit * unit, invvar[:, by0:by1, bx0:bx1])
                rows.append((i, truth, ivar))

    # masks
    maskbits = np.zeros((size, size), dtype=np.int16)
    maskbits[_nprimary(brick, wcs, size)] |= np.int16(1 << MASKBITS["NPRIMARY"])
    bright = np.zeros((size, size), dtype=bool)
    medium = np.zeros((size, size), dtype=bool)
    for i, mag in star_mag.items():   # all stars near the image, also those centred outside it
        if mag < 16.0:
            r = star_mask_radius_arcsec(mag) / layout.PIXSCALE
            _disk(medium, float(sx[i]), float(sy[i]), r)
            if mag < 13.0:
                _disk(bright, float(sx[i]), float(sy[i]), r)
    maskbits[medium] |= np.int16(1 << MASKBITS["MEDIUM"])
    maskbits[bright] |= np.int16(1 << MASKBITS["BRIGHT"])
    for b, band in enumerate(bands):
        if band in ALLMASK_BIT:
            maskbits[nexp[b] == 0] |= np.int16(1 << ALLMASK_BIT[band])

    # noise
    images = np.zeros_like(signal)
    for b in range(nb):
        covered = invvar[b] > 0
        noise = rng.standard_normal((size, size), dtype=np.float32)
        sigma_map = np.zeros((size, size), dtype=np.float32)
        sigma_map[covered] = 1.0 / np.sqrt(invvar[b][covered])
        images[b] = np.where(covered, signal[b] + noise * sigma_map, 0.0)

    # catalogue
    cat = _catalog(rows, src, sx, sy, wcs, brick, bands, cond, nexp, invvar, maskbits, rng)

    # files
    root = Path(job.out)
    files = []
    for b, band in enumerate(bands):
        cards = fitsout.brick_header(brick, wcs, bands, band, GENERATOR_VERSION)
        for kind, data in (("image", images[b]), ("invvar", invvar[b])):
            path = layout.image_path(root, brick.brickname, band, kind)
            dseed = int(np.random.default_rng([job.seed, brick.brickid, 7, b, len(kind)]).integers(1, 10001))
            fitsout.write_image(path, data, cards, kind, dseed)
            files.append(path)
    path = layout.maskbits_path(root, brick.brickname)
    fitsout.write_image(path, maskbits, fitsout.brick_header(brick, wcs, bands, None, GENERATOR_VERSION),
                        "maskbits", 0)
    files.append(path)
    path = layout.tractor_path(root, brick.brickname)
    fitsout.write_table(path, cat, fitsout.brick_header(brick, None, bands, None, GENERATOR_VERSION))
    files.append(path)
    covered = [float((nexp[b] > 0).mean()) for b in range(nb)]
    return dict(brickname=brick.brickname, brickid=brick.brickid, size=size,
                n_galaxies=int((cat["true_class"] >= 0).sum()), n_stars=int((cat["true_class"] < 0).sum()),
                n_primary=int(cat["brick_primary"].sum()), n_drawn=n_drawn,
                covered_fraction={band: round(c, 4) for band, c in zip(bands, covered)}, holes=holes,
                fwhm={b: round(cond.fwhm[b], 3) for b in bands}, depth={b: round(cond.depth[b], 3) for b in bands},
                files=[str(p) for p in files], seconds=round(time.perf_counter() - t0, 2))


def _catalog(rows, src, sx, sy, wcs, brick, bands, cond, nexp, invvar, maskbits, rng) -> np.ndarray:
    size = maskbits.shape[0]
    psfnorm2 = cond.psfnorms() ** 2
    keep = []
    for i, truth, ivar in rows:
        px = min(max(int(math.floor(sx[i] + 0.5)), 0), size - 1)
        py = min(max(int(math.floor(sy[i] + 0.5)), 0), size - 1)
        if np.any(nexp[:, py, px] > 0):   # a source with no coverage at its centre is not detected
            keep.append((i, truth, ivar, px, py))
    cat = np.zeros(len(keep), dtype=_catalog_dtype(bands))
    for objid, (i, truth, ivar, px, py) in enumerate(keep):
        r = cat[objid]
        ra, dec = float(src["ra"][i]), float(src["dec"][i])
        r["release"], r["brickid"], r["brickname"], r["objid"] = fitsout.RELEASE, brick.brickid, brick.brickname, objid
        r["brick_primary"] = bool(brick.contains(ra, dec))
        r["maskbits"] = maskbits[py, px]
        r["ra"], r["dec"], r["bx"], r["by"] = ra, dec, sx[i], sy[i]
        snr = 0.0
        for b, band in enumerate(bands):
            true_flux = truth[f"flux_{band}"]
            err = 1.0 / math.sqrt(ivar[b]) if ivar[b] > 0 else 0.0
            r[f"flux_{band}"] = true_flux + err * rng.standard_normal() if ivar[b] > 0 else 0.0
            r[f"flux_ivar_{band}"] = ivar[b]
            r[f"mw_transmission_{band}"] = 1.0
            r[f"nobs_{band}"] = nexp[b, py, px]
            r[f"psfsize_{band}"] = cond.fwhm[band]
            r[f"psfdepth_{band}"] = psfnorm2[b] * invvar[b, py, px]
            r[f"true_flux_{band}"] = true_flux
            snr = max(snr, true_flux * math.sqrt(max(ivar[b], 0.0)))
        pos_sigma = max(cond.fwhm[bands[0]], truth["r_half"]) / 2.355 / max(snr, 1.0) / 3600.0  # deg
        r["ra_ivar"] = r["dec_ivar"] = 1.0 / pos_sigma ** 2
        r["type"] = truth["type"]
        r["shape_r"] = truth["r_half"]
        r["shape_e1"], r["shape_e2"] = truth["e1"], truth["e2"]
        r["sersic"] = {"PSF": 0.0, "EXP": 1.0, "DEV": 4.0}.get(truth["type"], truth["sersic_n"])
        r["true_class"] = truth["class_index"]
        r["true_class_key"] = truth["class_key"]
        r["true_mag_r"] = truth["mag_r"]
        r["true_r_half"] = truth["r_half"]
        r["true_sersic"] = truth["sersic_n"]
        r["sim_id"] = src["sim_id"][i]
    return cat


# --- the survey -----------------------------------------------------------------------------------

def _params(size, seed, density, stars, bands, center, no_coverage, max_stamp) -> dict:
    return dict(generator="galaxalign_batch.simulate", generator_version=GENERATOR_VERSION, seed=int(seed),
                size=int(size), density=float(density), stars=float(stars), bands=list(bands),
                center=[float(center[0]), float(center[1])], no_coverage=float(no_coverage), max_stamp=int(max_stamp))


MANIFEST = "simulation.json"


def check_out(out: Path, params: dict, overwrite: bool) -> dict:
    """Refuse to mix a simulation into a directory made with other parameters (or not by us).

    The manifest is written before the first brick (``complete: false``), so a run killed part-way is
    recognised by its re-run with the same parameters, which writes its bricks again."""
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{manifest}: unreadable ({e}); use another --out or --overwrite") from None
        diff = [k for k in params if old.get("params", {}).get(k) != params[k]]
        if diff and not overwrite:
            shown = ", ".join(f"{k}={old.get('params', {}).get(k)!r} (now {params[k]!r})" for k in diff)
            raise ConfigError(f"{out} holds a simulation made with other parameters: {shown}; "
                              "use another --out or --overwrite")
        return old if not diff else {}
    if out.exists() and any(p for p in out.iterdir() if p.name != "labelled") and not overwrite:
        raise ConfigError(f"{out} exists and is not a simulation made by galaxalign-batch; "
                          "use an empty or new directory (or --overwrite)")
    return {}


def simulate_survey(out, *, bricks: int | list[str] = 4, size: int = 1024, seed: int = 0,
                    density: float = DEFAULT_DENSITY, stars: float = DEFAULT_STARS, center=DEFAULT_CENTER,
                    bands=layout.BANDS, no_coverage: float = 0.5, workers: int = 1, overwrite: bool = False,
                    max_stamp: int = MAX_STAMP, force_unlock: bool = False) -> dict:
    """Write a simulated Legacy Survey under ``out`` (DR9 layout) and return a summary.

    ``bricks``: a number of neighbouring real bricks around ``center`` (RA, Dec) or a list of brick
    names. ``size``: image side in px; 3600 is a full brick (neighbours overlap), smaller sizes are the
    central ``size`` x ``size`` px (no overlap below ~3435 px). ``density``/``stars``: galaxies/stars
    per full 3600x3600-px brick area (0.0686 deg^2). ``no_coverage``: probability that a brick gets
    one or two regions without coverage. Deterministic for ``seed``; ``workers`` > 1 makes bricks in
    parallel processes with identical results. The run holds ``out``'s lease (:mod:`galaxalign_batch.lease`):
    a second simulation into the same folder at the same time is refused (``force_unlock``: take the lease
    of a run you know is gone).
    """
    t0 = time.perf_counter()
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= layout.BRICK_SIZE:
        raise ConfigError(f"size must be an integer from {MIN_SIZE} to {layout.BRICK_SIZE} px, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not (density >= 0 and stars >= 0 and math.isfinite(density) and math.isfinite(stars)):
        raise ConfigError(f"density and stars must be finite and >= 0, got {density!r}, {stars!r}")
    if not 0.0 <= no_coverage <= 1.0:
        raise ConfigError(f"no_coverage must be a probability in [0, 1], got {no_coverage!r}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    bands = check_bands(bands)
    if isinstance(bricks, (int, np.integer)) and not isinstance(bricks, bool):
        chosen = choose_bricks(int(bricks), center)
    else:
        chosen = [layout.brick_by_name(n) for n in bricks]
        if not chosen:
            raise ConfigError("no bricks to simulate")
    out = Path(out)
    params = _params(size, seed, density, stars, bands, center, no_coverage, max_stamp)
    with lease.locked(out, force=force_unlock):
        return _simulate(out, params, chosen, old=check_out(out, params, overwrite), workers=workers, t0=t0)


def _simulate(out: Path, params: dict, chosen: list, *, old: dict, workers: int, t0: float) -> dict:
    size, seed, bands = params["size"], params["seed"], tuple(params["bands"])
    density, stars, no_coverage, max_stamp = (params["density"], params["stars"], params["no_coverage"],
                                              params["max_stamp"])
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_partials(out, recursive=True)  # files a killed run left half-written (we hold the lease)
    # before any brick: a killed run leaves a manifest its re-run recognises (and the bricks done before)
    atomic.write_json(out / MANIFEST, dict(params=params, bricks=old.get("bricks", []), complete=False), indent=2)

    jobs = [BrickJob(str(out), b, int(size), int(seed), float(density), float(stars), bands, float(no_coverage),
                     int(max_stamp)) for b in chosen]
    log.info("simulating %d brick(s) of %d px in %s (seed %d)", len(jobs), size, out, seed)
    if workers == 1 or len(jobs) == 1:
        results = [simulate_brick(j) for j in jobs]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(simulate_brick, jobs))

    names = sorted(set(old.get("bricks", [])) | {b.brickname for b in chosen})
    fitsout.write_table(layout.survey_bricks_path(out),
                        fitsout.survey_bricks_table([layout.brick_by_name(n) for n in names]))
    summary = dict(out=str(out), params=params, bricks=names,
                   n_galaxies=sum(r["n_galaxies"] for r in results), n_stars=sum(r["n_stars"] for r in results),
                   n_primary=sum(r["n_primary"] for r in results), per_brick=results,
                   seconds=round(time.perf_counter() - t0, 2))
    lease.check_held(out)
    atomic.write_json(out / MANIFEST, dict(params=params, bricks=names, complete=True), indent=2)
    return summary


__all__ = ["simulate_survey", "simulate_brick", "choose_bricks", "cell_sources", "MASKBITS", "DEFAULT_CENTER",
           "DEFAULT_DENSITY", "DEFAULT_STARS"]
