"""`galaxalign-batch search`: the stored galaxies most similar to an object, a sky position, an image, a text
or a drawn symbol; one query or a file of them."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch import atomic
from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch search --store sky.zarr --object 10000/1501p022/17 -k 12 --plot similar.png
  galaxalign-batch search --store sky.zarr --near 150.1234,2.2101 -k 10 --survey runs/sky
  galaxalign-batch search --store sky.zarr --image my_galaxy.png --model model.safetensors
  galaxalign-batch search --store sky.zarr --text "barred spiral galaxy with two arms" --model model.safetensors
  galaxalign-batch search --store sky.zarr --symbol drawing.png --model model.safetensors --dedup 3
  galaxalign-batch search --store sky.zarr --queries queries.txt --model model.safetensors --csv results.csv
  galaxalign-batch search --store big.zarr --object ID --index ivf     # builds STORE.ivf.faiss once
"""



def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.sky import parse_angle_arcsec
    from galaxalign_batch.store import open_readable
    from galaxalign_batch.downstream.search import (batch_table, plot_grid, read_queries, run_queries, run_query,
                                                    search_many)
    from galaxalign_batch.model.inputs import resolve_device

    radius = parse_angle_arcsec(args.radius, "--radius")
    dedup = parse_angle_arcsec(args.dedup, "--dedup") if args.dedup is not None else None
    if args.queries and args.plot:
        raise opt.UsageError("--plot draws one query's grid; with --queries write the table with --csv")
    image_scale = opt.picture_scale(args)
    items = read_queries(args.queries) if args.queries else None
    store = open_readable(args.store)
    device = str(resolve_device(args.device))
    if items is not None:
        queries = run_queries(store, items, model=args.model, radius_arcsec=radius, device=device,
                              image_scale=image_scale)
    else:
        queries = [run_query(store, object_id=args.object, near=args.near, image=args.image, text=args.text,
                             symbol=args.symbol, model=args.model, radius_arcsec=radius, device=device,
                             image_scale=image_scale)]
    results = search_many(store, queries, args.k, index=args.index, rebuild_index=args.rebuild_index,
                          target_recall=args.target_recall, dedup_arcsec=dedup, address=args.address)
    for i, result in enumerate(results):
        if i:
            print()
        for line in result.lines():
            print(line)
    if args.csv:
        table = batch_table(results) if items is not None else results[0].table
        with atomic.replacing(args.csv) as tmp:
            table.to_csv(tmp, index=False)
        print(f"table written to {args.csv} (with a Legacy Survey viewer link per result)")
    if args.plot:
        plot_grid(store, results[0], args.plot, roots=args.survey)
        print(f"picture grid written to {args.plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "search", help="similarity search in an embedding store",
        description=textwrap.dedent("""\
            Find the k stored galaxies most similar (cosine of the embeddings) to a query: a stored object
            (--object), the stored source nearest a sky position (--near), an image file (--image: a
            picture, shown north up, or a FITS cutout; through the image tower), a text (--text: through the
            text tower) or a drawing (--symbol: a sketch of the galaxy's shape, through the symbol encoder).
            Image, text and symbol queries are encoded by --model, which must be the store's model; an
            image-only checkpoint has no text or symbol tower. --queries FILE runs a batch (one query per
            line, 'KIND VALUE'), in one pass over the store. --dedup ARCSEC keeps one result per object on
            the sky. Exact search streams the store through the fused top-k kernel. For stores above ~10^7
            rows an approximate faiss index (IVF or HNSW) is built once, saved beside the store
            (STORE.ivf.faiss), and its recall@k against exact search is reported. Prints a table (id, ra,
            dec, score, label); --csv also writes it with a Legacy Survey viewer link per result; --plot
            draws the query and its neighbours from cutouts re-made from the tiles."""),
        epilog=EXAMPLES)
    opt.add_store(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--object", metavar="ID", help="a stored object id (e.g. 10000/1501p022/17)")
    q.add_argument("--near", metavar="RA,DEC", help="ICRS degrees; the nearest stored source within --radius is the query")
    q.add_argument("--image", metavar="FILE", help="a PNG/JPEG picture or a FITS cutout")
    q.add_argument("--text", metavar="TEXT", help="a description, e.g. \"barred spiral galaxy with two arms\"")
    q.add_argument("--symbol", metavar="FILE", help="a drawing of the galaxy's shape (PNG/JPEG; dark on light or light "
                                                    "on dark), encoded as the model's symbols")
    q.add_argument("--queries", metavar="FILE", help="a batch: one query per line, 'KIND VALUE' with KIND object, "
                                                     "near, image, text or symbol (or a CSV with columns kind, query); "
                                                     "the table gets query_index and query columns")
    opt.add_picture_scale(p, what="picture queries (--image PNG/JPEG, image lines of --queries)")
    p.add_argument("-k", "--k", type=int, default=10,
                   help="number of results, the query itself included; more than the store holds gives all its "
                        "rows (default 10)")
    p.add_argument("--index", default="auto", choices=["auto", "exact", "ivf", "hnsw"],
                   help="exact search, or an approximate faiss index; auto: exact below 10^7 rows, else ivf "
                        "(default: auto)")
    p.add_argument("--rebuild-index", action="store_true", help="build the approximate index again")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="when building an index, the recall@10 its search setting must reach (default 0.95)")
    opt.add_address(p, help="build a missing IVF index in HEALPix shards as Ray tasks on this cluster ('auto' or "
                            "host:port; 'local': a private local Ray instance); default: here")
    p.add_argument("--radius", default="5arcsec", help="search radius of --near (default 5arcsec)")
    p.add_argument("--dedup", metavar="ARCSEC", default=None,
                   help="results closer than this on the sky to a better-scoring result are the same object: kept "
                        "once, with a duplicates count (e.g. 2arcsec, or a number of arcsec)")
    p.add_argument("--model", metavar="CKPT", help="the store's model, to encode --image, --text, --symbol "
                                                   "(checkpoint, 'tiny', NAME:TAG)")
    opt.add_device(p)
    p.add_argument("--plot", metavar="GRID.png", help="write a picture grid of the query and its neighbours")
    opt.add_survey(p, help="survey root(s) holding the store's tiles (for --plot)")
    p.add_argument("--csv", metavar="FILE.csv", help="also write the result table as CSV (with viewer links)")
    p.set_defaults(func=run)
