"""`galaxalign-batch morphology`: statmorph parameters of every source (of a store, or of tiles) into a table."""

from __future__ import annotations

import argparse
import os
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch morphology --store runs/sky-embeddings.zarr --out morph.parquet
  galaxalign-batch morphology --store sky.zarr --survey /data/dr9/south --out morph.fits --limit 1000 --workers 2
  galaxalign-batch morphology --tiles runs/sky --bricks 1501p022 --out morph.csv --psf-fwhm 1.2
  galaxalign-batch join --store sky.zarr --catalog morph.parquet --on object_id --out with_morph.parquet
  galaxalign-batch morphology --store sky.zarr --regress morph.parquet     # heads -> store columns morphology/*
"""


def _psf(text: str):
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a FWHM in arcsec, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"the PSF FWHM must be > 0 arcsec, got {text!r}")
    return v


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.morphology import MorphologyConfig, measure_store, measure_tiles

    if args.regress:
        return _regress(args)
    if args.targets or args.method != "ridge":
        raise opt.UsageError("--targets and --method go with --regress TABLE")
    if not args.out:
        raise opt.UsageError("give --out TABLE (measure) or --regress TABLE (fit heads and write store columns)")
    if args.bricks and not args.tiles:
        raise opt.UsageError("--bricks selects bricks of a --tiles survey root")
    if args.limit is not None and args.limit < 1:
        raise opt.UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.workers < 1:
        raise opt.UsageError(f"--workers must be at least 1, got {args.workers}")
    cfg = MorphologyConfig(band=args.band, stamp_px=args.stamp, max_stamp_px=args.max_stamp)
    if args.store:
        summary = measure_store(args.store, args.out, roots=args.survey, limit=args.limit, workers=args.workers,
                                cfg=cfg, psf_fwhm=args.psf_fwhm)
    else:
        summary = measure_tiles(args.tiles, args.out, bricks=args.bricks, catalog=args.sources, limit=args.limit,
                                workers=args.workers, cfg=cfg, psf_fwhm=args.psf_fwhm)
    for line in summary.lines():
        print(line)
    return 0


def _regress(args: argparse.Namespace) -> int:
    from galaxalign_batch.morphology.apply import DEFAULT_TARGETS, regress_store

    if not args.store:
        raise opt.UsageError("--regress applies heads to the rows of a store: give --store STORE (not --tiles)")
    if args.out:
        raise opt.UsageError("--regress writes store columns; --out (a measured table) does not go with it")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else list(DEFAULT_TARGETS)
    summary = regress_store(args.store, args.regress, targets=targets, method=args.method, seed=args.seed,
                            batch_rows=args.batch_rows, force=args.force, force_unlock=args.force_unlock)
    for line in summary.lines():
        print(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "morphology", help="non-parametric morphology (C, A, S, Gini, M20, Petrosian radius, Sersic) per source",
        description=textwrap.dedent("""\
            Measure concentration, asymmetry, smoothness, Gini, M20, Petrosian and half-light radii and a
            PSF-convolved Sersic fit (index, half-light radius) of every source with statmorph, on a stamp of
            one band (default r) cut from its tile, segmented with photutils (1.5 sigma, 5 px, SExtractor-like
            deblending). Sources: the rows of an embedding store (tiles re-opened from --survey roots, the
            store's survey_roots, or cube paths), or the sources of --tiles (Tractor catalog, else detection).
            Writes one row per source keyed by object_id (Parquet, FITS or CSV by the suffix of --out) with
            statmorph's flag (0 good, 1 suspect, 2 bad, 4 catastrophic) and flag_sersic; a source that cannot
            be measured gets flag 4 and its reason in `error` instead of stopping the run. Radii in arcsec.

            --regress TABLE (with --store): fit regression heads from the store's embeddings to the
            parameters of TABLE (a table this command measured, or any with object_id and the columns),
            print their cross-validated scores, and write their predictions for every row into the store
            as columns morphology/<target> (default: sersic_n, sersic_rhalf_circ, axis_ratio = 1 -
            sersic_ellip); resumable, never half-written."""),
        epilog=EXAMPLES)
    src = p.add_mutually_exclusive_group(required=True)  # what to measure: one of
    opt.add_store(src, required=False, help="measure the rows of this embedding store")
    opt.add_tiles(src, help="measure the sources of these tiles (files, folders, globs, @lists, survey roots; as embed)")
    opt.add_survey(p)
    opt.add_bricks(p)
    opt.add_sources(p)
    p.add_argument("--out", metavar="TABLE", help="output table: .parquet, .fits or .csv/.ecsv")
    g = p.add_argument_group("regression heads into the store (--regress)")
    g.add_argument("--regress", metavar="TABLE", help="fit heads on this table's sources (object_id + parameters) and "
                                                      "write their predictions for every store row as columns")
    g.add_argument("--targets", metavar="COL,COL", help="the parameters to predict (default: sersic_n, "
                                                        "sersic_rhalf_circ, axis_ratio)")
    g.add_argument("--method", default="ridge", choices=["ridge", "mlp"], help="the regressor (docs/morphology.md)")
    opt.add_seed(g, help="seed of the cross-validation folds and the MLP")
    opt.add_batch_rows(g)
    opt.add_force(g, help="fit and write again even if the store's columns are up to date")
    opt.add_force_unlock(g)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="measure only the first N sources")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes measuring in parallel (default: min(4, cores))")
    p.add_argument("--band", default="r", help="band of the stamps (default: r)")
    p.add_argument("--psf-fwhm", type=_psf, default="auto", metavar="auto|none|ARCSEC",
                   help="PSF for the Sersic fit (Moffat beta=3): auto = median psfsize of the brick's Tractor "
                        "catalog, else 1.3\"; none = fit without PSF (default: auto)")
    p.add_argument("--stamp", type=int, default=96, metavar="PX", help="initial stamp side (grown as needed)")
    p.add_argument("--max-stamp", type=int, default=400, metavar="PX", help="largest stamp side")
    p.set_defaults(func=run)
