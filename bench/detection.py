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

``--learned`` (issue 16): the learned detection head on the frozen foundation vs a Faster R-CNN
baseline vs sep on the same held-out simulated fields, for training sets of ``--train-sizes``
fields (bench/detection_learned.py explains the data and the runs):

    python bench/detection.py --learned --data DIR --work DIR [--models head,pixels,rcnn]
        [--train-sizes 100,300,1000] [--seeds 0] [--steps 200 | --epochs 12] [--batch-size 8]
        [--precision fp32|bf16] [--eval-every STEPS] [--threads 1] [--report] [--json PATH]
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
    ap.add_argument("--bricks", type=int, default=None, help="bricks to simulate (default 4; --learned 7)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="simulated survey folder (made if missing; default: a temporary folder)")
    ap.add_argument("--radius", type=float, default=None, help="minimum match radius, arcsec (default: the module's)")
    ap.add_argument("--learned", action="store_true", help="learned head vs Faster R-CNN vs sep (issue 16)")
    ap.add_argument("--work", help="--learned: folder for fields, runs and detector files")
    ap.add_argument("--models", default="head,pixels,rcnn", help="--learned: head, pixels (ablation), rcnn")
    ap.add_argument("--train-sizes", default="100,300,1000", help="--learned: training set sizes (fields)")
    ap.add_argument("--seeds", default="0", help="--learned: training seeds")
    ap.add_argument("--steps", type=int, default=200, help="--learned: optimizer steps of every run")
    ap.add_argument("--epochs", type=float, default=None,
                    help="--learned: budget in passes over each training set (steps = epochs x N / batch; "
                         "overrides --steps)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="--learned: forward passes in fp32 or under bf16 autocast (both detectors)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="--learned: evaluate the held-out fields every this many steps (a learning curve)")
    ap.add_argument("--batch-size", type=int, default=8, help="--learned: fields per step")
    ap.add_argument("--field", type=int, default=128, help="--learned: field side, px")
    ap.add_argument("--test-fields", type=int, default=200, help="--learned: held-out fields")
    ap.add_argument("--score", type=float, default=0.3, help="--learned: score threshold for P/R/F1")
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "galaxalign_batch" / "data"
                                           / "foundation-tiny.safetensors"), help="--learned: the foundation")
    ap.add_argument("--threads", type=int, default=1, help="--learned: torch threads")
    ap.add_argument("--report", action="store_true", help="--learned: print the tables of the runs done")
    args = ap.parse_args(argv)
    if args.learned:
        return learned(args)
    args.bricks = args.bricks or 4

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


def learned(args) -> int:
    import detection_learned as L

    if not args.data or not args.work:
        raise SystemExit("--learned needs --data (simulated survey, made if missing) and --work")
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in L.MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad} (one of {', '.join(L.MODELS)})")
    args.train_sizes = [int(v) for v in args.train_sizes.split(",")]
    args.seeds = [int(v) for v in args.seeds.split(",")]
    args.bricks = args.bricks or 7
    args.sim_seed = args.seed
    args.command_line = " ".join([os.path.basename(sys.executable), *sys.argv])
    if args.report:
        out = L.report(args)
        out["command"] = args.command_line
        out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=float))
            print(f"figures written to {args.json}")
        return 0
    L.train_runs(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
