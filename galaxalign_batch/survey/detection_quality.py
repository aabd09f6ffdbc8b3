"""Detection quality: the project's sep detection against a reference catalog (simulated truth or Tractor).

Matching is one-to-one on the sky (astropy ``search_around_sky``): every (detection, reference)
pair closer than the reference source's radius, ``max(radius, size_factor x r_half)``, is a
candidate; candidates are taken in order of separation and a pair is kept when neither member is
taken yet (greedy; for isolated sources this is the nearest neighbour both ways). From the matches:

- **completeness**: the fraction of reference sources with a matched detection, by reference
  magnitude (``true_mag_r`` when the catalog has truth, else its ``flux_r``), galaxies and stars;
- **purity**: the fraction of detections matched to a reference source, by detection magnitude
  (the detection's ``flux_r``); unmatched detections near a reference galaxy are counted as its
  *fragments* (shredding), the rest as *spurious*;
- **blended pairs**: reference pairs, both brighter than ``pair_mag_limit``, by separation over
  the sum of their sizes ``R = sqrt(r_half^2 + (FWHM/2)^2)``: *resolved* (both matched, i.e. two
  detections), *merged* (one matched), *missed* (neither);
- **offsets**: detection minus reference position of the matches (arcsec), stars and galaxies.

Only sources away from the tile edge and from coverage gaps (``edge_arcsec`` from any invalid
pixel or the border) are counted, on both sides: a galaxy centred just off the image is drawn
into it and detected, but is in no catalog of that tile.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from galaxalign_batch.errors import GalaxAlignError

log = logging.getLogger(__name__)

#: Match radius (arcsec): ~1.2 DECaLS PSF FWHM. Isolated sources match within 0.1-0.5"; galaxies
#: whose catalog centre is not their brightest point (mergers, disturbed) lie further (see docs/detection.md).
DEFAULT_RADIUS_ARCSEC = 1.5
DEFAULT_MAG_BINS = (12.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0, 22.0, 24.0)
#: ... or this many times its half-light radius, when larger (extended galaxies: see docs/detection.md).
DEFAULT_SIZE_FACTOR = 1.0
DEFAULT_EDGE_ARCSEC = 8.0
#: Reference pairs are binned by separation / (R1 + R2), R = sqrt(r_half^2 + (FWHM/2)^2): below ~1 the
#: isophotes at the half-light radius overlap.
DEFAULT_PAIR_BINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_PAIR_MAG_LIMIT = 21.0
#: An unmatched detection within this many R of a reference galaxy is a fragment of it (shredding).
DEFAULT_FRAGMENT_FACTOR = 2.0
DEFAULT_FWHM_ARCSEC = 1.3


class DetectionError(GalaxAlignError):
    """A catalog that cannot be compared (missing columns, nothing to compare)."""


def _require(table: Table, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise DetectionError(f"{what}: missing column(s) {', '.join(missing)} (has: {', '.join(table.colnames)})")


def flux_to_mag(flux) -> np.ndarray:
    """AB magnitude of nanomaggies (zero point 22.5); NaN where the flux is not positive."""
    f = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, 22.5 - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def reference_magnitude(table: Table, band: str = "r") -> np.ndarray:
    """``true_mag_<band>`` when the catalog carries truth, else the magnitude of its ``flux_<band>``."""
    if f"true_mag_{band}" in table.colnames:
        return np.asarray(table[f"true_mag_{band}"], dtype=np.float64)
    if f"flux_{band}" in table.colnames:
        return flux_to_mag(table[f"flux_{band}"])
    raise DetectionError(f"reference catalog: no true_mag_{band} or flux_{band} column for magnitudes")


def match_catalogs(det_ra, det_dec, ref_ra, ref_dec, radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
                   ref_radius_arcsec=None):
    """One-to-one sky match. Returns ``(ref_to_det, det_to_ref, separation)``: the matched index on the
    other side (-1 when unmatched) and, per reference source, the separation in arcsec (NaN unmatched).

    ``ref_radius_arcsec``: optional per-reference-source radius (array); a pair is a candidate when it
    is closer than that source's radius (``radius_arcsec`` is then ignored).
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    if not radius_arcsec > 0:
        raise DetectionError(f"match radius must be > 0 arcsec, got {radius_arcsec!r}")
    det_ra, det_dec = np.atleast_1d(np.asarray(det_ra, np.float64)), np.atleast_1d(np.asarray(det_dec, np.float64))
    ref_ra, ref_dec = np.atleast_1d(np.asarray(ref_ra, np.float64)), np.atleast_1d(np.asarray(ref_dec, np.float64))
    ref_to_det = np.full(len(ref_ra), -1, np.int64)
    det_to_ref = np.full(len(det_ra), -1, np.int64)
    sep = np.full(len(ref_ra), np.nan)
    if len(det_ra) == 0 or len(ref_ra) == 0:
        return ref_to_det, det_to_ref, sep
    per_ref = None
    if ref_radius_arcsec is not None:
        per_ref = np.broadcast_to(np.asarray(ref_radius_arcsec, np.float64), ref_ra.shape)
        if not np.all(per_ref > 0):
            raise DetectionError("per-source match radii must all be > 0 arcsec")
        radius_arcsec = float(per_ref.max())
    d = SkyCoord(det_ra * u.deg, det_dec * u.deg)
    r = SkyCoord(ref_ra * u.deg, ref_dec * u.deg)
    i_det, i_ref, s, _ = search_around_sky(d, r, radius_arcsec * u.arcsec)
    s = s.to_value(u.arcsec)
    if per_ref is not None:
        keep = s <= per_ref[i_ref]
        i_det, i_ref, s = i_det[keep], i_ref[keep], s[keep]
    for k in np.lexsort((i_det, i_ref, s)):  # by separation; ties in a fixed order
        a, b = i_det[k], i_ref[k]
        if det_to_ref[a] < 0 and ref_to_det[b] < 0:
            det_to_ref[a], ref_to_det[b], sep[b] = b, a, s[k]
    return ref_to_det, det_to_ref, sep


@dataclass
class DetectionReport:
    """Tables of a detection-vs-reference comparison (astropy Tables) and summary numbers."""

    completeness: Table
    purity: Table
    pairs: Table
    offsets: Table
    totals: dict
    by_class: Table | None = None
    settings: dict = field(default_factory=dict)
    ref_to_det: np.ndarray | None = None
    det_to_ref: np.ndarray | None = None

    def as_dict(self) -> dict:
        def rows(t: Table | None):
            return None if t is None else [{k: _plain(v) for k, v in zip(t.colnames, row)} for row in t]
        return {"settings": self.settings, "totals": self.totals, "offsets": rows(self.offsets),
                "completeness": rows(self.completeness), "purity": rows(self.purity), "pairs": rows(self.pairs),
                "by_class": rows(self.by_class)}

    def lines(self) -> list[str]:
        """The tables as aligned text."""
        st, tot = self.settings, self.totals

        def fmt(t: Table) -> list[str]:
            t = t.copy()
            for c in t.colnames:
                if t[c].dtype.kind == "f":
                    t[c].format = "{:.3f}"
            return t.pformat(max_lines=-1, max_width=-1)

        out = [f"reference {tot['reference']}, detections {tot['detections']}, matched {tot['matched']}: "
               f"completeness {tot['completeness']:.3f}, purity {tot['purity']:.3f} "
               f"({tot['fragments']} unmatched detections are fragments of a reference galaxy, "
               f"{tot['spurious']} are not)",
               f"match radius max({st['radius_arcsec']}\", {st['size_factor']} x r_half); PSF FWHM "
               f"{st['fwhm_arcsec']:.2f}\"; magnitudes: {st['magnitudes']} {st['band']}", "",
               "positional offsets of matches (detection - reference, arcsec):"]
        out += fmt(self.offsets)
        out += ["", "completeness by reference magnitude:"] + fmt(self.completeness)
        out += ["", "purity by detection magnitude:"] + fmt(self.purity)
        if self.by_class is not None:
            out += ["", "completeness by true class:"] + fmt(self.by_class)
        out += ["", f"reference pairs (both {st['band']} < {st['pair_mag_limit']}) by separation / (R1 + R2), "
                    "R = sqrt(r_half^2 + (FWHM/2)^2):"]
        out += fmt(self.pairs)
        return out


def _plain(v):
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.str_):
        return str(v)
    return v


def _fraction(k, n) -> np.ndarray:
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    return np.where(n > 0, k / np.where(n > 0, n, 1.0), np.nan)


def _bin_labels(edges) -> list[str]:
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]


def _count_bins(idx: np.ndarray, nbins: int, *flags: np.ndarray) -> list[np.ndarray]:
    """Per bin: the number of entries, then the number with each flag."""
    return [np.array([np.sum((idx == i) & f) for i in range(nbins)], np.int64)
            for f in (np.ones(len(idx), bool),) + flags]


def reference_size(table: Table) -> np.ndarray:
    """Half-light radius (arcsec) of each reference source: ``true_r_half``, else Tractor ``shape_r``, else 0."""
    for c in ("true_r_half", "shape_r"):
        if c in table.colnames:
            v = np.asarray(table[c], np.float64)
            return np.where(np.isfinite(v) & (v > 0), v, 0.0)
    return np.zeros(len(table))


def point_like(table: Table) -> np.ndarray:
    """Stars / point sources of a reference catalog (true class ``star``, or Tractor type ``PSF``)."""
    if "true_class_key" in table.colnames:
        return np.char.strip(np.asarray(table["true_class_key"]).astype(str)) == "star"
    if "type" in table.colnames:
        return np.char.strip(np.asarray(table["type"]).astype(str)) == "PSF"
    return reference_size(table) == 0


def _offset_rows(det: Table, ref: Table, ref_to_det: np.ndarray, groups: dict[str, np.ndarray]) -> Table:
    names, n, med, p68, p95, mra, mdec = [], [], [], [], [], [], []
    for name, sel in groups.items():
        m = np.flatnonzero((ref_to_det >= 0) & sel)
        names.append(name)
        n.append(len(m))
        if not len(m):
            for lst in (med, p68, p95, mra, mdec):
                lst.append(np.nan)
            continue
        d = ref_to_det[m]
        dec = np.radians(np.asarray(ref["dec"], np.float64)[m])
        dra = (np.asarray(det["ra"], np.float64)[d] - np.asarray(ref["ra"], np.float64)[m] + 180) % 360 - 180
        dra = dra * np.cos(dec) * 3600.0
        ddec = (np.asarray(det["dec"], np.float64)[d] - np.asarray(ref["dec"], np.float64)[m]) * 3600.0
        r = np.hypot(dra, ddec)
        med.append(np.median(r)), p68.append(np.percentile(r, 68)), p95.append(np.percentile(r, 95))
        mra.append(dra.mean()), mdec.append(ddec.mean())
    return Table({"sources": names, "n_matched": np.array(n, np.int64), "median": med, "p68": p68, "p95": p95,
                  "mean_dra_cosdec": mra, "mean_ddec": mdec})


def close_pairs(ra, dec, max_sep_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i < j) of positions closer than ``max_sep_arcsec``, and their separations (arcsec)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    if len(ra) < 2 or not max_sep_arcsec > 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    c = SkyCoord(np.asarray(ra, np.float64) * u.deg, np.asarray(dec, np.float64) * u.deg)
    i, j, s, _ = c.search_around_sky(c, max_sep_arcsec * u.arcsec)
    keep = i < j
    return i[keep].astype(np.int64), j[keep].astype(np.int64), s.to_value(u.arcsec)[keep]


def compare_catalogs(detections: Table, reference: Table, *, radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
                     size_factor: float = DEFAULT_SIZE_FACTOR, mag_bins=DEFAULT_MAG_BINS, band: str = "r",
                     fwhm_arcsec: float | None = None, pair_bins=DEFAULT_PAIR_BINS,
                     pair_mag_limit: float = DEFAULT_PAIR_MAG_LIMIT, fragment_factor: float = DEFAULT_FRAGMENT_FACTOR,
                     counted_detections: np.ndarray | None = None,
                     counted_reference: np.ndarray | None = None) -> DetectionReport:
    """Compare a detection table with a reference catalog (truth or Tractor); see the module docstring.

    A reference source's match radius is ``max(radius_arcsec, size_factor x r_half)`` (r_half from
    :func:`reference_size`). ``counted_*``: boolean masks of the rows that enter the statistics (default
    all); every row takes part in the matching. ``fwhm_arcsec``: the PSF FWHM (default: the median
    ``psfsize_<band>`` of the reference, else 1.3").
    """
    _require(detections, ("ra", "dec"), "detections")
    _require(reference, ("ra", "dec"), "reference catalog")
    if len(reference) == 0:
        raise DetectionError("reference catalog is empty: nothing to measure completeness against")
    ref_mag = reference_magnitude(reference, band)
    if f"flux_{band}" not in detections.colnames:
        raise DetectionError(f"detections: missing column flux_{band} (has: {', '.join(detections.colnames)})")
    det_mag = flux_to_mag(detections[f"flux_{band}"])
    cd = np.ones(len(detections), bool) if counted_detections is None else np.asarray(counted_detections, bool)
    cr = np.ones(len(reference), bool) if counted_reference is None else np.asarray(counted_reference, bool)
    if len(cd) != len(detections) or len(cr) != len(reference):
        raise DetectionError("counted_detections / counted_reference must have one entry per row")
    if fwhm_arcsec is None:
        col = f"psfsize_{band}"
        vals = np.asarray(reference[col], np.float64) if col in reference.colnames else np.zeros(0)
        vals = vals[np.isfinite(vals) & (vals > 0)]
        fwhm_arcsec = float(np.median(vals)) if len(vals) else DEFAULT_FWHM_ARCSEC
    size = reference_size(reference)
    stars = point_like(reference)
    edges = np.asarray(mag_bins, np.float64)
    nbins = len(edges) - 1

    ref_to_det, det_to_ref, _ = match_catalogs(detections["ra"], detections["dec"], reference["ra"], reference["dec"],
                                               ref_radius_arcsec=np.maximum(radius_arcsec, size_factor * size))
    found = ref_to_det >= 0
    ridx = np.digitize(ref_mag, edges) - 1
    n, k, ng, kg = _count_bins(ridx[cr], nbins, found[cr], ~stars[cr], (found & ~stars)[cr])
    completeness = Table({"mag_bin": _bin_labels(edges), "n_reference": n, "n_detected": k,
                          "completeness": _fraction(k, n), "n_galaxies": ng,
                          "galaxy_completeness": _fraction(kg, ng), "n_stars": n - ng,
                          "star_completeness": _fraction(k - kg, n - ng)})

    # Unmatched detections within fragment_factor x R of a reference galaxy are pieces of it (shredding).
    good = det_to_ref >= 0
    fragment = np.zeros(len(detections), bool)
    lone = np.flatnonzero(~good)
    gal = np.flatnonzero(~stars & (size > 0))
    if len(lone) and len(gal):
        import astropy.units as u
        from astropy.coordinates import SkyCoord

        big = np.hypot(size[gal], fwhm_arcsec / 2)
        dc = SkyCoord(np.asarray(detections["ra"])[lone] * u.deg, np.asarray(detections["dec"])[lone] * u.deg)
        gc = SkyCoord(np.asarray(reference["ra"])[gal] * u.deg, np.asarray(reference["dec"])[gal] * u.deg)
        i_d, i_g, s, _ = gc.search_around_sky(dc, fragment_factor * float(big.max()) * u.arcsec)
        hit = s.to_value(u.arcsec) <= fragment_factor * big[i_g]
        fragment[lone[np.unique(i_d[hit])]] = True
    didx = np.digitize(np.where(np.isfinite(det_mag), det_mag, edges[-1] - 1e-9), edges) - 1  # no flux: faintest bin
    n2, k2, f2 = _count_bins(didx[cd], nbins, good[cd], fragment[cd])
    purity = Table({"mag_bin": _bin_labels(edges), "n_detections": n2, "n_matched": k2, "purity": _fraction(k2, n2),
                    "n_fragments": f2, "n_spurious": n2 - k2 - f2})

    by_class = None
    if "true_class_key" in reference.colnames:
        keys = np.char.strip(np.asarray(reference["true_class_key"]).astype(str))
        names = sorted(set(keys[cr]))
        nn = np.array([np.sum(cr & (keys == c)) for c in names], np.int64)
        kk = np.array([np.sum(cr & found & (keys == c)) for c in names], np.int64)
        by_class = Table({"class": names, "n_reference": nn, "n_detected": kk, "completeness": _fraction(kk, nn)})

    # Blended pairs: both members bright enough to be found alone, separation in units of their sizes.
    radius = np.hypot(size, fwhm_arcsec / 2)
    pedges = np.asarray(pair_bins, np.float64)
    pi, pj, ps = close_pairs(reference["ra"], reference["dec"], float(pedges[-1] * 2 * radius.max()))
    ratio = ps / (radius[pi] + radius[pj])
    keep = cr[pi] & cr[pj] & (ref_mag[pi] < pair_mag_limit) & (ref_mag[pj] < pair_mag_limit) & (ratio < pedges[-1])
    pi, pj, ps, ratio = pi[keep], pj[keep], ps[keep], ratio[keep]
    both = found[pi] & found[pj]
    one = found[pi] ^ found[pj]
    pidx = np.digitize(ratio, pedges) - 1
    cnt, res, mer = _count_bins(pidx, len(pedges) - 1, both, one)
    star_pair = stars[pi] | stars[pj]
    med_sep = [float(np.median(ps[pidx == b])) if np.any(pidx == b) else np.nan for b in range(len(pedges) - 1)]
    pairs = Table({"sep_over_R1+R2": _bin_labels(pedges), "n_pairs": cnt,
                   "with_star": _count_bins(pidx, len(pedges) - 1, star_pair)[1], "median_sep_arcsec": med_sep,
                   "resolved": res, "merged": mer, "missed": cnt - res - mer, "resolved_fraction": _fraction(res, cnt)})

    offsets = _offset_rows(detections, reference, ref_to_det,
                           {"stars": cr & stars, "galaxies": cr & ~stars, "all": cr})
    n_ref, n_det = int(cr.sum()), int(cd.sum())
    totals = dict(reference=n_ref, detections=n_det, matched=int((found & cr).sum()),
                  matched_detections=int((good & cd).sum()),
                  completeness=float(_fraction((found & cr).sum(), n_ref)),
                  purity=float(_fraction((good & cd).sum(), n_det)),
                  fragments=int((fragment & cd).sum()), spurious=int((~good & ~fragment & cd).sum()),
                  pairs=int(len(ps)))
    settings = dict(radius_arcsec=float(radius_arcsec), size_factor=float(size_factor), band=band,
                    mag_bins=[float(e) for e in edges], fwhm_arcsec=float(fwhm_arcsec),
                    pair_bins=[float(e) for e in pedges], pair_mag_limit=float(pair_mag_limit),
                    fragment_factor=float(fragment_factor),
                    magnitudes="true_mag" if f"true_mag_{band}" in reference.colnames else "flux")
    return DetectionReport(completeness, purity, pairs, offsets, totals, by_class, settings, ref_to_det, det_to_ref)


def read_reference(path: str | os.PathLike, tile=None) -> Table:
    """A Tractor(-like) catalog with *all* its columns (truth included), placed on ``tile``.

    Standard Sources columns come from :func:`galaxalign_batch.survey.read_tractor` (``brick_primary``
    rows, off-tile rows dropped); the other catalog columns (``true_mag_r``, ``true_r_half``,
    ``true_sersic``, ``psfsize_r``, ``sim_id``, ...) are joined on ``objid`` (and ``brickname``).
    """
    import fitsio

    from galaxalign_batch.survey import read_tractor

    base = read_tractor(path, tile)
    full = Table(fitsio.read(os.fspath(path), ext=1, lower=True))
    names = np.char.strip(np.asarray(full["brickname"]).astype(str))
    key = {(str(b), int(o)): i for i, (b, o) in enumerate(zip(names, np.asarray(full["objid"])))}
    rows = np.array([key[(str(b), int(o))] for b, o in zip(base["brickname"], base["objid"])], np.int64)
    for c in full.colnames:
        if c in base.colnames or c in ("bx", "by"):
            continue
        col = np.asarray(full[c])[rows] if len(rows) else np.asarray(full[c])[:0]
        base[c] = np.char.strip(col.astype(str)) if col.dtype.kind in "SU" else col
    return base


def counted_mask(tile, x, y, edge_arcsec: float = DEFAULT_EDGE_ARCSEC) -> np.ndarray:
    """True where (x, y) lies at least ``edge_arcsec`` from the tile border and from any pixel without
    coverage in some band (those regions are left out of the statistics on both sides)."""
    from scipy import ndimage

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    covered = np.asarray(tile.valid).all(axis=0)
    padded = np.pad(covered, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded)[1:-1, 1:-1] * tile.pixscale
    h, w = covered.shape
    ix = np.clip(np.floor(x + 0.5).astype(np.int64), 0, w - 1)
    iy = np.clip(np.floor(y + 0.5).astype(np.int64), 0, h - 1)
    inside = (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
    return inside & (dist[iy, ix] >= edge_arcsec)


@dataclass
class TileComparison:
    tile: str
    detections: Table
    reference: Table
    counted_detections: np.ndarray
    counted_reference: np.ndarray
    detect_seconds: float


def compare_tile(tile, reference: str | os.PathLike | Table | None = "auto", *,
                 edge_arcsec: float = DEFAULT_EDGE_ARCSEC, **detect_kw) -> TileComparison:
    """Detect the sources of ``tile`` with :func:`galaxalign_batch.survey.detect_sources` and pair them with
    its reference catalog: ``"auto"`` the survey tree's Tractor catalog of the brick, a path, or a table."""
    import time

    from galaxalign_batch.survey import detect_sources, layout
    from galaxalign_batch.survey.bricks import survey_root_of

    if isinstance(reference, Table):
        ref = reference
    else:
        path = reference
        if isinstance(reference, str) and reference == "auto":
            root = survey_root_of(tile)
            path = layout.tractor_path(root, tile.name) if root is not None else None
            if path is None or not os.path.exists(path):
                raise DetectionError(f"{tile.path}: no Tractor or truth catalog for this tile (a viewer cutout "
                                     "cube has none): give one to compare against")
        if path is None:
            raise DetectionError(f"{tile.path}: no reference catalog given")
        ref = read_reference(path, tile)
    _require(ref, ("ra", "dec", "x", "y"), "reference catalog")
    t0 = time.perf_counter()
    det = detect_sources(tile, **detect_kw)
    seconds = time.perf_counter() - t0
    return TileComparison(tile.name, det, ref, counted_mask(tile, det["x"], det["y"], edge_arcsec),
                          counted_mask(tile, ref["x"], ref["y"], edge_arcsec), seconds)


def combine(comparisons: list[TileComparison], **compare_kw) -> DetectionReport:
    """One report over several tiles (their tables stacked; matching never crosses tiles)."""
    from astropy.table import vstack

    if not comparisons:
        raise DetectionError("no tiles to compare")
    # Matching runs on the stacked tables: tiles that do not overlap on the sky cannot cross-match.
    det = vstack([c.detections for c in comparisons], metadata_conflicts="silent")
    ref = vstack([c.reference for c in comparisons], metadata_conflicts="silent")
    cd = np.concatenate([c.counted_detections for c in comparisons])
    cr = np.concatenate([c.counted_reference for c in comparisons])
    report = compare_catalogs(det, ref, counted_detections=cd, counted_reference=cr, **compare_kw)
    report.settings["tiles"] = [c.tile for c in comparisons]
    report.settings["detect_seconds"] = [round(c.detect_seconds, 3) for c in comparisons]
    return report
