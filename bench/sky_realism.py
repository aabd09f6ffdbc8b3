"""How much the simulated sky looks like the real one: statmorph morphology of simulated galaxies per
class and of the real DECaLS cubes in tests/data, against published relations (issue 13 item 6).

1. draws ``--per-class`` isolated galaxies of each Galaxy10 class with the simulator
   (``galaxalign_batch.simulate.draw_galaxy``), r uniform in ``--mag-range``, each with its own
   random seeing and depth (``Conditions.random``, as the labelled set) and sky noise, at 0.262"/px;
   galaxy ``i`` of class ``c`` comes from seed ``(seed, 7, c, i)``;
2. measures each in the r band with the project's statmorph wrapper
   (``galaxalign_batch.morphology.measure.measure_source``: photutils segmentation, Moffat PSF of the
   image's FWHM), and an r magnitude in a circular aperture of 2 Petrosian radii;
3. measures the real cubes (tests/data/decals_cutouts: ``example_{a,b,c,e}`` at the viewer's
   0.10-0.14"/px and ``temp_small`` = example_a at the native 0.262"/px) the same way, with
   sep's background rms as noise and a 1.3" PSF (galaxalign_batch.morphology's default); the
   viewer's finer pixels hold the value of a native pixel (surface brightness), so their aperture
   magnitudes are corrected by 5 log10(0.262 / pixscale) (checked: example_a at 0.1"/px then agrees
   with temp_small, the same galaxy at 0.262"/px);
4. prints per class the median (16-84 %) of C, A, Gini, M20, the fraction in each Lotz et al. (2008)
   Gini-M20 region, statmorph's Gini-M20 bulge statistic F(G, M20) and the size-magnitude relation:
   median rhalf_circ per magnitude bin against the exponential-disc size of a disc with the r-band
   central surface brightness <mu_0> = 20.2 +- 0.7 mag/arcsec^2 of Fathi (2010) (face-on, no
   inclination correction): h = sqrt(10^(-0.4 (m - mu_0)) / (2 pi)), r_half = 1.678 h.

    python bench/sky_realism.py [--per-class 30] [--seed 0] [--workers 1] [--json PATH] [--label NAME]

To measure another generator version, put its source tree first on PYTHONPATH (e.g. an old commit
unpacked with ``git archive b7d5ef3 galaxalign_batch | tar -x -C /tmp/old``;
``PYTHONPATH=/tmp/old python bench/sky_realism.py``): the script reports GENERATOR_VERSION.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "tests" / "data" / "decals_cutouts"
REAL_FILES = ("example_a.fits", "example_b.fits", "example_c.fits.gz", "example_e.fits.gz", "temp_small.fits")
MAG_EDGES = (15.5, 16.5, 17.5, 18.5, 19.01)
FATHI_MU0, FATHI_SIG = 20.2, 0.7      # Fathi (2010, ApJ 722, L120): r-band <mu_0> of SDSS discs, r < 17
NATIVE = 0.262                        # arcsec/px of the Legacy Survey coadds
REAL_PSF_FWHM = 1.3                   # arcsec: galaxalign_batch.morphology's DEFAULT_PSF_FWHM_ARCSEC


def lotz_region(gini: float, m20: float) -> str:
    """Lotz et al. (2008, ApJ 672, 177) Gini-M20 regions: merger if G > -0.14 M20 + 0.33, else
    E/S0/Sa if G > 0.14 M20 + 0.80, else Sb-Ir."""
    if gini > -0.14 * m20 + 0.33:
        return "merger"
    if gini > 0.14 * m20 + 0.80:
        return "E/S0/Sa"
    return "Sb-Ir"


def disc_r_half(mag: float, mu0: float = FATHI_MU0) -> float:
    """Half-light radius (arcsec) of a face-on exponential disc of magnitude ``mag`` and central
    surface brightness ``mu0``: m = mu0 - 2.5 log10(2 pi h^2)."""
    h = math.sqrt(10 ** (-0.4 * (mag - mu0)) / (2 * math.pi))
    return 1.678 * h


def aperture_mag(image: np.ndarray, cx: float, cy: float, radius_px: float) -> float:
    yy, xx = np.indices(image.shape)
    f = float(image[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius_px ** 2].sum())
    return 22.5 - 2.5 * math.log10(f) if f > 0 else float("nan")


def measure_one(image, noise, pixscale, fwhm) -> dict:
    from galaxalign_batch.morphology.measure import MorphologyConfig, measure_source, moffat_psf

    cfg = MorphologyConfig()
    h, w = image.shape
    x, y = (w - 1) / 2.0, (h - 1) / 2.0
    psf = moffat_psf(fwhm, pixscale)
    row = measure_source(image.astype(np.float64), noise, np.ones(image.shape, bool), x, y, pixscale, cfg, psf)
    rp = row.get("rpetro_circ", float("nan"))
    row["mag_ap"] = aperture_mag(image, x, y, 2.0 * rp / pixscale) if np.isfinite(rp) and rp > 0 else float("nan")
    r = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
    if np.isfinite(r.get("gini", np.nan)) and np.isfinite(r.get("m20", np.nan)):
        r["lotz"] = lotz_region(r["gini"], r["m20"])
        r["bulge_F"] = -0.693 * r["m20"] + 4.95 * r["gini"] - 3.96   # statmorph's gini_m20_bulge
    return r


def sim_job(args) -> list[dict]:
    c, n, seed, mag_range = args
    from galaxalign_batch.simulate import Conditions, class_keys, draw_galaxy
    from galaxalign_batch.survey.layout import PIXSCALE

    key = class_keys()[c]
    rows = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 7, c, i]))
        cond = Conditions.random(rng, ("g", "r", "z"))
        mag = float(rng.uniform(*mag_range))
        img, truth = draw_galaxy(key, rng, psf=cond, bands=("g", "r", "z"), mag_r=mag,
                                 offset=tuple(rng.uniform(-0.5, 0.5, 2)))
        sig = cond.sigmas().astype(np.float32)
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * sig[:, None, None]
        noise = np.full(img.shape[1:], float(sig[1]), np.float64)
        t0 = time.perf_counter()
        row = measure_one(img[1], noise, PIXSCALE, float(cond.fwhm["r"]))
        row.update(kind="sim", class_key=key, index=i, mag_true=mag, r_half_true=truth["r_half"],
                   stamp=int(img.shape[-1]), seconds=time.perf_counter() - t0)
        rows.append(row)
    return rows


def real_rows(tmp: Path) -> list[dict]:
    from galaxalign_batch.morphology.measure import band_noise
    from galaxalign_batch.survey import open_tile

    rows = []
    for name in REAL_FILES:
        src = REAL / name
        if name.endswith(".gz"):
            dst = tmp / name[:-3]
            with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
                shutil.copyfileobj(fi, fo)
            src = dst
        tile = open_tile(src)
        b = tile.band_index("r")
        t0 = time.perf_counter()
        row = measure_one(tile.image[b].astype(np.float64), band_noise(tile, b), tile.pixscale, REAL_PSF_FWHM)
        # the viewer resamples to finer pixels keeping the value per native 0.262" pixel (surface
        # brightness), so a sum over its pixels is (0.262 / pixscale)^2 too bright
        if np.isfinite(row["mag_ap"]):
            row["mag_ap"] += 5.0 * math.log10(NATIVE / tile.pixscale)
        row.update(kind="real", class_key=name.split(".")[0], pixscale=float(tile.pixscale),
                   seconds=time.perf_counter() - t0)
        rows.append(row)
    return rows


def q(v, p):
    v = np.asarray([x for x in v if x is not None and np.isfinite(x)], float)
    return float(np.percentile(v, p)) if len(v) else float("nan")


def summarise(rows: list[dict], keys: list[str]) -> dict:
    out = {}
    for k in keys:
        rs = [r for r in rows if r["class_key"] == k and r.get("flag", 4) <= 1]
        n_all = sum(r["class_key"] == k for r in rows)
        s = dict(n=len(rs), n_all=n_all)
        for col in ("concentration", "asymmetry", "gini", "m20", "bulge_F"):
            vals = [r.get(col) for r in rs]
            s[col] = [q(vals, 50), q(vals, 16), q(vals, 84)]
        regions = [r.get("lotz") for r in rs if r.get("lotz")]
        s["lotz"] = {z: (sum(x == z for x in regions) / len(regions) if regions else float("nan"))
                     for z in ("E/S0/Sa", "Sb-Ir", "merger")}
        out[k] = s
    return out


def size_mag(rows: list[dict]) -> list[dict]:
    """Median rhalf_circ (statmorph) per aperture-magnitude bin, discs (spirals + edge-ons) and smooth."""
    groups = {"discs": ("barred_spiral", "unbarred_tight_spiral", "unbarred_loose_spiral"),
              "edge-on": ("edge_on_no_bulge", "edge_on_with_bulge"),
              "smooth": ("round_smooth", "in_between_round_smooth", "cigar_smooth")}
    out = []
    for lo, hi in zip(MAG_EDGES[:-1], MAG_EDGES[1:]):
        mid = 0.5 * (lo + hi)
        d = dict(mag=f"{lo:.1f}-{hi:.1f}", fathi_disc=disc_r_half(mid),
                 fathi_lo=disc_r_half(mid, FATHI_MU0 - FATHI_SIG), fathi_hi=disc_r_half(mid, FATHI_MU0 + FATHI_SIG))
        for g, ks in groups.items():
            v = [r["rhalf_circ"] for r in rows if r["class_key"] in ks and r.get("flag", 4) <= 1
                 and lo <= r.get("mag_ap", np.nan) < hi]
            d[g] = [q(v, 50), len(v)]
            t = [r["r_half_true"] for r in rows if r["class_key"] in ks and lo <= r["mag_true"] < hi]
            d[g + "_true"] = q(t, 50)
        out.append(d)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mag-range", type=float, nargs=2, default=(15.5, 19.0))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--json", help="write rows and summaries here")
    ap.add_argument("--label", default="", help="a name for this run in the output (e.g. old / new)")
    args = ap.parse_args(argv)

    import galaxalign_batch
    from galaxalign_batch.simulate import GENERATOR_VERSION, class_keys

    keys = class_keys()
    print(f"# machine: {cpu_model()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# galaxalign_batch from {Path(galaxalign_batch.__file__).parent}, GENERATOR_VERSION {GENERATOR_VERSION}")
    print(f"# command: python bench/sky_realism.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    t0 = time.perf_counter()
    jobs = [(c, args.per_class, args.seed, tuple(args.mag_range)) for c in range(len(keys))]
    if args.workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers) as pool:
            sim = [r for rs in pool.map(sim_job, jobs) for r in rs]
    else:
        sim = [r for j in jobs for r in sim_job(j)]
    real = []
    if not args.no_real:
        with tempfile.TemporaryDirectory() as tmp:
            real = real_rows(Path(tmp))
    wall = time.perf_counter() - t0

    summ = summarise(sim, keys)
    print(f"\n## simulated, {args.per_class} per class, r {args.mag_range[0]}-{args.mag_range[1]} (flag <= 1)")
    print(f"{'class':26s} {'n':>5s}  {'C':>16s} {'A':>18s} {'Gini':>16s} {'M20':>18s}  E/S0/Sa Sb-Ir merger")
    fmt = lambda v, d=2: f"{v[0]:.{d}f} ({v[1]:.{d}f}-{v[2]:.{d}f})"  # noqa: E731
    for k in keys:
        s = summ[k]
        lz = s["lotz"]
        print(f"{k:26s} {s['n']:>2d}/{s['n_all']:<2d}  {fmt(s['concentration'])} {fmt(s['asymmetry'], 3)} "
              f"{fmt(s['gini'])} {fmt(s['m20'])}  {lz['E/S0/Sa']:.2f}    {lz['Sb-Ir']:.2f}  {lz['merger']:.2f}")
    if real:
        print("\n## real DECaLS cubes (tests/data/decals_cutouts), r band")
        for r in real:
            print(f"{r['class_key']:14s} {r['pixscale']:.3f}\"/px flag {r.get('flag')}  C {r['concentration']:.2f}  "
                  f"A {r['asymmetry']:.3f}  Gini {r['gini']:.2f}  M20 {r['m20']:.2f}  {r.get('lotz', '-'):8s} "
                  f"r_ap {r['mag_ap']:.2f}  rhalf_circ {r['rhalf_circ']:.2f}\"  rpetro {r['rpetro_circ']:.2f}\"")
    sm = size_mag(sim)
    print("\n## size-magnitude: median statmorph rhalf_circ (arcsec, flag <= 1) by aperture r magnitude "
          "[n]; truth r_half of the main body by true r; Fathi (2010) face-on disc for mu_0 20.2 +- 0.7")
    print(f"{'r':10s} {'discs':>12s} {'edge-on':>12s} {'smooth':>12s}   {'true disc':>9s} {'true smooth':>11s}  "
          "Fathi disc (mu0 19.5-20.9)")
    for d in sm:
        print(f"{d['mag']:10s} {d['discs'][0]:7.2f} [{d['discs'][1]:2d}] {d['edge-on'][0]:7.2f} [{d['edge-on'][1]:2d}] "
              f"{d['smooth'][0]:7.2f} [{d['smooth'][1]:2d}]   {d['discs_true']:9.2f} {d['smooth_true']:11.2f}  "
              f"{d['fathi_disc']:.2f} ({d['fathi_lo']:.2f}-{d['fathi_hi']:.2f})")
    secs = [r["seconds"] for r in sim]
    print(f"\n# {len(sim)} simulated + {len(real)} real measured in {wall:.0f} s wall "
          f"(statmorph median {np.median(secs):.1f} s per source)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            label=args.label, generator_version=GENERATOR_VERSION, machine=cpu_model(), args=vars(args),
            seconds=wall, summary=summ, size_mag=sm, real=real, sim=sim), indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
