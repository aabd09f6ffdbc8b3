"""`galaxalign-batch embed`: embed every source of survey tiles into a Zarr store, with Ray."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from galaxalign_batch.cli import _options

log = logging.getLogger("galaxalign_batch")

DEFAULT_SURVEY = "runs/sky"
DEFAULT_STORE = "runs/sky-embeddings.zarr"


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.engine import embed_tiles
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.survey.bands import parse_bands

    tiles_args = args.tiles
    if not tiles_args:
        # The embedded default: a simulated survey, made on first use.
        from galaxalign_batch.simulate import simulate_survey
        from galaxalign_batch.survey import layout

        if not layout.is_survey_root(DEFAULT_SURVEY):
            log.info("no --tiles given: simulating the default survey into %s", DEFAULT_SURVEY)
            simulate_survey(DEFAULT_SURVEY)
        tiles_args = [DEFAULT_SURVEY]
        model = args.model or "tiny"  # the embedded default's smoke run: random weights, warned in the summary
    elif args.model is None:
        raise _options.UsageError("embed: --model is required with --tiles (a checkpoint from 'galaxalign-batch train', "
                          "e.g. runs/train/model.safetensors, or an open_clip NAME:/path/to/weights); "
                          "'--model tiny' embeds with RANDOM weights, for smoke tests only")
    else:
        model = args.model
    bricks = list(args.bricks or [])
    if args.bricks_file:
        bricks += [b.strip() for b in Path(args.bricks_file).read_text().split() if b.strip()]
    columns = {} if getattr(args, "targets", None) else {k: getattr(args, k, None) for k in ("id_col", "ra_col", "dec_col")}
    tiles = resolve_tiles(tiles_args, bricks or None, image_columns=columns)
    out = args.out or DEFAULT_STORE
    selection = _selection(args, tiles, out)
    summary = embed_tiles(tiles, model, out, batch_size=args.batch_size, cpu_workers=args.cpu_workers,
                          cpu_threads=args.cpu_threads,
                          gpu_workers=args.gpu_workers, device=args.device, precision=args.precision,
                          address=args.address,
                          catalog=args.sources, embedding_dtype=args.dtype, retry_failed=not args.skip_failed,
                          commit_rows=args.commit_rows, commit_seconds=args.commit_seconds,
                          force_unlock=args.force_unlock, max_image_pixels=args.max_image_pixels,
                          log_every=args.log_every, image_scale=_options.picture_scale(args), stretch=args.stretch,
                          bands=parse_bands(args.bands), selection=selection, executor=args.executor)
    for line in summary.lines() + selection.lines():
        print(line)
    return 0 if summary.ok else 3


def _selection(args: argparse.Namespace, tiles: list, out: str):
    """The run's selection (--targets / --where / --keep-columns / --section-reads), checked before Ray."""
    from galaxalign_batch.engine.preflight import check_catalog
    from galaxalign_batch.engine.selection import make_selection

    args.sources = check_catalog(args.sources)  # one line for a missing or wrong catalogue, before it is read
    selection = make_selection(tiles, out, catalog=args.sources, targets=args.targets, ra_col=args.ra_col,
                               dec_col=args.dec_col, id_col=args.id_col, where=args.where,
                               keep_columns=args.keep_columns, sections=args.section_reads)
    from galaxalign_batch.survey.images import ImageRef

    chosen = selection.restrict(tiles)
    pictures = sum(isinstance(t, ImageRef) for t in chosen)
    kinds = f" ({len(chosen) - pictures} FITS, {pictures} picture(s))" if pictures and pictures < len(chosen) else ""
    log.info("embedding %d tile(s)%s with %s into %s", len(chosen), kinds, args.model or "tiny", out)
    return selection


def register(sub) -> None:
    p = sub.add_parser(
        "embed", help="embed survey tiles into a Zarr store with Ray",
        description="Embed every source of survey tiles into a Zarr embedding store (docs/store.md). Resumable: "
                    "a re-run skips tiles already in the store and retries failed ones. One run writes a store at "
                    "a time (a lock beside it, STORE.lock); the model, --sources, --out and the lock are checked "
                    "before Ray starts. Exit code 0 when every tile is in the store, 3 when some failed (listed) "
                    "or were lost to a worker failure, 1 for an error before or during the run.")
    _options.add_tiles(p, help="tile files, folders, globs, @list.txt, a Legacy Survey root (folder with coadd/) or "
                               "release (folder with north/ and south/ roots), PNG/JPEG pictures or a CSV listing "
                               f"them; default: the simulated survey in {DEFAULT_SURVEY} (made on first use)")
    _options.add_bricks(p)
    p.add_argument("--bricks-file", metavar="FILE", help="file of brick names (whitespace separated)")
    p.add_argument("--model", default=None,
                   help="a checkpoint of ours (model.safetensors or its folder), an open_clip NAME:TAG or NAME:/path/weights, "
                        "or 'tiny' (the registered tiny test config with RANDOM weights: smoke tests only, warned in "
                        "the summary and recorded in the store). Required with --tiles; without --tiles (the "
                        "embedded default, a simulated survey) it is tiny")
    p.add_argument("--out", metavar="STORE.zarr", help=f"the store (default: {DEFAULT_STORE})")
    _options.add_sources(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="model batch size (default: 256 on a GPU, 64 on CPU where larger batches are slower)")
    p.add_argument("--cpu-workers", type=int, default=None,
                   help="CPUs for a local Ray instance (default: all cores); ignored with --address")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads per CPU model replica; one replica per this many CPUs "
                        "(default: 1 up to 15 CPUs, else CPUs // 8; see docs/engine.md)")
    p.add_argument("--gpu-workers", type=int, default=None, help="GPU model actors (default: one per GPU in the cluster)")
    _options.add_device(p)
    _options.add_precision(p)
    p.add_argument("--executor", default="ray", choices=["ray", "local"],
                   help="ray: tile tasks and a pool of model replicas on Ray (local, or the cluster of --address); "
                        "local: everything in this process, one tile after another, without Ray (small runs)")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster ('auto' or host:port); default: start Ray locally")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="embedding dtype in the store")
    p.add_argument("--commit-rows", type=int, default=65536,
                   help="commit finished tiles to the store once this many rows are buffered (default 65536)")
    p.add_argument("--commit-seconds", type=float, default=30.0,
                   help="... or once this many seconds passed since the last commit (default 30): at most this "
                        "much work is redone after a crash")
    p.add_argument("--skip-failed", action="store_true", help="do not retry tiles that failed in an earlier run")
    _options.add_force_unlock(p)
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse (as a failed tile) an image whose FITS header declares more than N pixels, before "
                        "reading it (default 268435456 = 2**28, or GALAXALIGN_MAX_IMAGE_PIXELS)")
    p.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a batch job's log), log progress (tiles, sources/s, ETA) "
                        "every this many seconds (default 30; 0: never)")
    inp = p.add_argument_group("what the tiles show (docs/engine.md, 'Inputs')")
    _options.add_picture_scale(inp)
    _options.add_stretch(inp, default=None, help="the stretch of FITS cutouts (default: the model's CutoutSpec): lupton (the Legacy Survey "
                          "viewer's), asinh, or gz-decals (Galaxy Zoo DECaLS images). Another stretch than a "
                          "trained checkpoint's is warned about; recorded in the store")
    inp.add_argument("--bands", metavar="BANDS",
                     help="bands to read, e.g. griz for DR10 south (default: the model's, g r z). Bands the model "
                          "has no colour plane for are not read, and the summary says so")
    sel = p.add_argument_group("selection (docs/engine.md, 'Selecting sources')")
    sel.add_argument("--targets", metavar="FILE",
                     help="embed a cutout at each position of this list (CSV, FITS or Parquet) instead of every "
                          "catalogue source; each target goes to its primary brick (or the tile holding it); "
                          "targets outside every tile are counted and listed in STORE.targets-outside.csv")
    sel.add_argument("--ra-col", help="the targets' RA column (default: found by name: RA, ra, RAJ2000, ...); "
                                      "degrees, or sexagesimal hours (10:00:28.6)")
    sel.add_argument("--dec-col", help="the targets' Dec column (default: found by name: DEC, dec, DEJ2000, ...)")
    sel.add_argument("--id-col", help="a column of unique target ids, kept in the store as target_id "
                                      "(default: the row number)")
    sel.add_argument("--where", metavar="EXPR",
                     help="embed only the catalogue sources passing this cut, e.g. \"type != 'PSF' and mag_r < 19\" "
                          "(comparisons, and/or/not, parentheses; mag_g/r/z = 22.5 - 2.5 log10(flux_g/r/z))")
    sel.add_argument("--keep-columns", metavar="A,B,...",
                     help="catalogue columns kept in the store, one value per row ('none' for none; default for "
                          "Tractor input: type, flux_g/r/z, flux_ivar_g/r/z, shape_r, shape_e1, shape_e2, sersic; "
                          "with --targets: columns of the targets file, none by default)")
    sel.add_argument("--section-reads", choices=["auto", "always", "never"], default="auto",
                     help="for --targets / --where on bricks, decompress only the image tiles the cutouts need "
                          "(auto: when that is at most half the brick; default auto)")
    p.set_defaults(func=run)
