"""`galaxalign-batch verify --store STORE`: check every committed row of an embedding store; say what to re-run."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.store.verify import verify_store

    if bool(args.store) == bool(args.store_positional):
        raise opt.UsageError("give the store to check: --store STORE.zarr")
    report = verify_store(args.store or args.store_positional, repair=args.repair)
    for line in report.lines():
        print(line)
    return 0 if report.ok or report.repaired else 1


def register(sub) -> None:
    p = sub.add_parser(
        "verify", help="check an embedding store (rows vs tile table, unique ids, norms, every chunk readable)",
        description=textwrap.dedent("""\
            Check a whole embedding store: the commit record against the arrays, the tile table (done tiles'
            rows cover the committed rows without gaps or overlaps), every chunk of committed rows present and
            decodable, object ids unique and non-empty, embeddings finite and unit-norm. Prints one line per
            problem (store, array, chunk) and what to re-run. Exit code 0 when the store is sound, 1 when not.
            With --repair, rolls the store back to just before the first damaged commit (and removes damaged
            shard files) so that re-running the same embed command re-embeds exactly the tiles rolled back.
            Readers need no lock; --repair takes the store's lock like any writer. See docs/store.md."""),
        epilog="example:\n  galaxalign-batch verify --store runs/sky-embeddings.zarr\n"
               "  galaxalign-batch verify --store sky.zarr --repair && galaxalign-batch embed --tiles ... --out sky.zarr")
    opt.add_store(p, required=False)
    p.add_argument("store_positional", nargs="?", metavar="STORE.zarr", help=argparse.SUPPRESS)  # the first spelling
    p.add_argument("--repair", action="store_true",
                   help="roll back past the first damage so that the same embed command redoes it")
    p.set_defaults(func=run)
