"""Detection quality on a freshly simulated survey: sep detection vs the simulator's truth catalogs.

Simulates ``--bricks`` bricks of ``--size`` px (fixed ``--seed``; sizes below 3435 px do not
overlap, so every source is in exactly one brick), detects each brick with
``galaxalign_batch.survey.detect_sources`` (the engine's defaults) and compares with
``galaxalign_batch.survey.detection_quality``:

1. against the truth columns of the simulated Tractor-like catalogs (``true_mag_r``, ``true_r_half``,
   ``true_class_key``);
2. against the catalog's Tractor columns only (magnitudes from the noisy ``flux_r``, sizes from
   ``shape_r``, stars from ``type == PSF``): the path a real Tractor catalog takes.

    python bench/detection.py [--json PATH] [--bricks 4] [--size 2048] [--seed 0] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402


def tractor_only(ref):
    """The reference without truth columns: what a real Tractor catalog has."""
    keep = [c for c in ref.colnames if not c.startswith("true_") and c != "sim_id"]
    return ref[keep]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--bricks", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="simulated survey folder (made if missing; default: a temporary folder)")
    ap.add_argument("--radius", type=float, default=None, help="minimum match radius, arcsec (default: the module's)")
    args = ap.parse_args(argv)

    from galaxalign_batch.survey import detection_quality as D
    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.survey import layout, open_tile

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="galaxalign-bench-detection-")
        root = tmp.name
    else:
        root = args.data
    t0 = time.perf_counter()
    sim = simulate_survey(root, bricks=args.bricks, size=args.size, seed=args.seed, workers=min(2, os.cpu_count() or 1))
    sim_seconds = time.perf_counter() - t0
    print(f"simulated {args.bricks} bricks of {args.size} px (seed {args.seed}): {sim['n_galaxies']} galaxies, "
          f"{sim['n_stars']} stars in {sim_seconds:.1f} s")
    kw = {} if args.radius is None else {"radius_arcsec": args.radius}

    comparisons = []
    for brick in layout.list_bricks(root):
        tile = open_tile(root, brick)
        comparisons.append(D.compare_tile(tile, "auto"))
    report = D.combine(comparisons, **kw)
    print("\n== against the simulated truth ==")
    print("\n".join(report.lines()))

    tractor = [D.TileComparison(c.tile, c.detections, tractor_only(c.reference), c.counted_detections,
                                c.counted_reference, c.detect_seconds) for c in comparisons]
    report_tractor = D.combine(tractor, **kw)
    print("\n== against the Tractor columns only (flux_r magnitudes, shape_r sizes, type PSF) ==")
    print("\n".join(report_tractor.lines()))

    det_s = sum(c.detect_seconds for c in comparisons)
    n_det = sum(len(c.detections) for c in comparisons)
    print(f"\ndetection: {n_det} sources in {det_s:.2f} s over {len(comparisons)} bricks")
    out = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "simulation": {"bricks": args.bricks, "size": args.size, "seed": args.seed, "seconds": sim_seconds,
                       "galaxies": sim["n_galaxies"], "stars": sim["n_stars"],
                       "psf_fwhm_r": {b["brickname"]: b["fwhm"]["r"] for b in sim["per_brick"]}},
        "detection_seconds": det_s,
        "detections": n_det,
        "truth": report.as_dict(),
        "tractor_columns": report_tractor.as_dict(),
        "detect_settings": [dict(c.detections.meta.get("detection", {}), tile=c.tile) for c in comparisons],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
        print(f"figures written to {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
