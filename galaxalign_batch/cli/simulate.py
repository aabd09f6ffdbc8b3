"""`galaxalign-batch simulate`: write a simulated Legacy Survey (and optionally a labelled cutout set)."""

from __future__ import annotations

import argparse
import json

from galaxalign_batch.cli import _options as opt


def _summary_lines(s: dict) -> list[str]:
    p = s["params"]
    lines = [f"wrote {len(s['per_brick'])} brick(s) of {p['size']}x{p['size']} px (seed {p['seed']}, "
             f"bands {''.join(p['bands'])}) to {s['out']} in {s['seconds']:.1f} s:"]
    for r in s["per_brick"]:
        holes = f", {len(r['holes'])} region(s) without coverage" if r["holes"] else ""
        lines.append(f"  {r['brickname']}: {r['n_galaxies']} galaxies, {r['n_stars']} stars "
                     f"({r['n_primary']} brick_primary){holes}")
    lines += [f"  images/invvar/maskbits: {s['out']}/coadd/<AAA>/<brick>/legacysurvey-<brick>-*.fits.fz",
              f"  catalogues: {s['out']}/tractor/<AAA>/tractor-<brick>.fits; bricks: {s['out']}/survey-bricks.fits"]
    return lines


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.lease import locked
    from galaxalign_batch.simulate import simulate_labelled, simulate_survey

    result = {}
    with locked(args.out, args.force_unlock):  # one lease over both parts: no other run between them
        survey = simulate_survey(args.out, bricks=args.bricks, size=args.size, seed=args.seed, density=args.density,
                                 stars=args.stars, center=tuple(args.center), no_coverage=args.no_coverage,
                                 workers=args.workers, overwrite=args.overwrite)
        result["survey"] = survey
        if args.labelled:
            result["labelled"] = simulate_labelled(args.out, n_per_class=args.n_per_class, stamp_size=args.stamp_size,
                                                   seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                                                   neighbours=args.neighbours)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in _summary_lines(survey):
        print(line)
    if args.labelled:
        m = result["labelled"]
        n = {s: sum(c.values()) for s, c in m["counts"].items()}
        print(f"labelled set ({m['stamp_size']}x{m['stamp_size']} px, {len(m['vocabulary']['keys'])} classes) "
              f"in {m['seconds']:.1f} s: " + ", ".join(f"{s} {n[s]} -> {m['files'][s]}" for s in m["files"]))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "simulate", help="write a simulated Legacy Survey (the embedded default data)",
        description="Write a simulated DESI Legacy Imaging Survey in the DR9/DR10 file layout: real-grid bricks "
                    "with galsim galaxies of the 10 Galaxy10 classes and stars, Moffat PSF and sky noise at survey "
                    "depth (fpacked image/invvar/maskbits per band, Tractor catalogues with the true class, "
                    "survey-bricks.fits). Deterministic for a seed. See docs/simulate.md.")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (the survey root)")
    p.add_argument("--bricks", type=int, default=4, metavar="N",
                   help="number of neighbouring bricks (a near-square block starting at --center)")
    p.add_argument("--size", type=int, default=1024, metavar="PX",
                   help="image side in pixels: 3600 = full brick (neighbours overlap), smaller = the brick's "
                        "central SIZE x SIZE px")
    opt.add_seed(p, help="random seed (same seed, same files)")
    p.add_argument("--density", type=float, default=2000.0, metavar="N",
                   help="galaxies per full 3600x3600-px brick area (0.0686 deg^2)")
    p.add_argument("--stars", type=float, default=300.0, metavar="N", help="stars per full brick area")
    p.add_argument("--center", type=float, nargs=2, default=(150.1, 2.2), metavar=("RA", "DEC"),
                   help="sky position (deg) of the first brick")
    p.add_argument("--no-coverage", type=float, default=0.5, metavar="P",
                   help="probability that a brick gets one or two regions without coverage (invvar 0)")
    p.add_argument("--labelled", action="store_true",
                   help="also write the labelled cutout set DIR/labelled/{train,val,test}.npz")
    p.add_argument("--n-per-class", type=int, default=120, metavar="N", help="labelled images per class")
    p.add_argument("--stamp-size", type=int, default=152, metavar="PX", help="labelled cutout side in pixels")
    p.add_argument("--neighbours", default="0", metavar="N|survey",
                   help="galaxies (and proportionally stars) drawn around each labelled one, mean per stamp; 'survey': "
                        "the survey default's density (3.6 galaxies + 0.5 stars per 152-px stamp); 0: isolated")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel processes (results identical)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into DIR even if it holds a simulation with other parameters")
    opt.add_force_unlock(p)
    p.add_argument("--json", action="store_true", help="print the full summary as JSON")
    p.set_defaults(func=run)
