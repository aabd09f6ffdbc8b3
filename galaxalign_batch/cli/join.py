"""`galaxalign-batch join`: cross-match a catalog with an embedding store (by position or object id)."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch join --store sky.zarr --catalog my_targets.csv --out matched.parquet --radius 1arcsec
  galaxalign-batch join --store sky.zarr --catalog sdss.fits --out m.parquet --radius 1.5 --ra-col RA_OBJ --dec-col DEC_OBJ
  galaxalign-batch join --store sky.zarr --catalog picks.parquet --out p.parquet --on object_id --with-embedding
  galaxalign-batch join --store dr10.zarr --catalog desi_targets.parquet --out matched/ --address auto   # a Ray cluster
"""


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.sky import parse_angle_arcsec
    from galaxalign_batch.downstream.join import join_catalog

    radius = None if args.on is not None else parse_angle_arcsec(args.radius or "1arcsec", "--radius")
    partitioned = not args.out.lower().endswith((".parquet", ".pq"))
    if args.address and not partitioned:
        raise opt.UsageError("join --address writes a folder of partition files: give --out a folder name "
                             "(not .parquet)")
    if partitioned:
        if args.on is not None:
            raise opt.UsageError("join --on (key join) writes one Parquet file: give --out NAME.parquet "
                                 "(a partitioned key join is not supported)")
        from galaxalign_batch.downstream.partitioned import PARTITION_ROWS, join_partitioned

        summary = join_partitioned(args.store, args.catalog, args.out, radius=radius, ra_col=args.ra_col,
                                   dec_col=args.dec_col, catalog_format_=args.format,
                                   with_embedding=args.with_embedding, inner=args.inner,
                                   kept=_kept(args.store_columns), address=args.address, threads=args.threads,
                                   partition_rows=args.partition_rows or PARTITION_ROWS, force=args.force,
                                   force_unlock=args.force_unlock)
        for line in summary.lines():
            print(line)
        return 0
    summary = join_catalog(args.store, args.catalog, args.out, radius=radius, on=args.on, ra_col=args.ra_col,
                           dec_col=args.dec_col, catalog_format=args.format, with_embedding=args.with_embedding,
                           inner=args.inner, workers=args.threads, kept=_kept(args.store_columns))
    for line in summary.lines():
        print(line)
    return 0


def _kept(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [] if names == ["none"] else names


def register(sub) -> None:
    p = sub.add_parser(
        "join", help="cross-match a catalog with an embedding store",
        description=textwrap.dedent("""\
            Join your catalog (FITS table, CSV or Parquet) with the store and write a Parquet file: every
            catalog row, plus the matched source's object_id, store_ra/store_dec, separation_arcsec and,
            when the store is classified, label, confidence and probs (list of K; class keys in the file
            metadata); --with-embedding adds the embedding. Positional matching takes the nearest stored
            source within --radius (default 1arcsec), exactly on the sphere (RA wrap and poles included),
            partitioned by HEALPix and streamed over the store with dask, so the store may exceed memory.
            --on COLUMN instead joins the catalog column holding store object ids. RA/Dec columns are found
            by name (ra, RA, RAJ2000, ra_deg, ...) or given with --ra-col/--dec-col. Unmatched rows are kept
            with nulls unless --inner.

            --out FOLDER (any name not ending in .parquet) writes one Parquet file per HEALPix partition and a
            _SUCCESS manifest, streaming the catalogue instead of loading it: for catalogues and stores beyond
            one machine. It is resumable (a re-run keeps the partitions already written) and runs on a Ray
            cluster with --address (docs/downstream.md, "join at survey scale")."""),
        epilog=EXAMPLES)
    opt.add_store(p)
    p.add_argument("--catalog", required=True, metavar="CAT", help="FITS table, CSV (.csv/.tsv) or Parquet file")
    p.add_argument("--out", required=True, metavar="OUT.parquet|FOLDER",
                   help="the output: one Parquet file (written atomically), or a folder of partition files")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--radius", help="match radius, e.g. 1arcsec, 0.5arcsec, 2e-4deg; a bare number is arcsec "
                                      "(default 1arcsec)")
    how.add_argument("--on", metavar="COLUMN", help="key join: the catalog column holding store object ids")
    p.add_argument("--ra-col", help="the catalog's RA column (ICRS degrees; default: found by name)")
    p.add_argument("--dec-col", help="the catalog's Dec column (ICRS degrees; default: found by name)")
    p.add_argument("--format", choices=["fits", "csv", "parquet"], help="catalog format (default: from the suffix)")
    p.add_argument("--with-embedding", action="store_true", help="add the embedding of the matched source")
    p.add_argument("--inner", action="store_true", help="keep only catalog rows with a match")
    p.add_argument("--store-columns", metavar="A,B,...",
                   help="which catalogue columns the store keeps (embed --keep-columns, target_id) to add: "
                        "'none', or names (default: all of them)")
    opt.add_threads(p, help="threads of the cross-match (default: all cores)")
    opt.add_address(p, help="run the partitioned join as Ray tasks on this cluster ('auto' or host:port; 'local': "
                            "a private local Ray instance); needs --out FOLDER on a file system every node sees")
    p.add_argument("--partition-rows", type=int, default=None, metavar="N",
                   help="with --out FOLDER: at most this many store rows per HEALPix partition (default 2000000)")
    opt.add_force(p, help="with --out FOLDER: join again even if the folder holds this join, finished")
    opt.add_force_unlock(p)
    opt.add_deprecated_alias(p, "--workers", "--threads", "threads", type=int)
    p.set_defaults(func=run)
