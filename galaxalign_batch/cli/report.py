"""`galaxalign-batch report`: a self-contained HTML report of an embedding store."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch report --store runs/sky-embeddings.zarr --out report.html
  galaxalign-batch report --store sky.zarr --out report.html --survey /data/dr10 --examples 10
"""


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.downstream.report import write_report

    summary = write_report(args.store, args.out, roots=args.survey, examples=args.examples, truth=args.truth,
                           max_points=args.max_points)
    for line in summary.lines():
        print(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="HTML report of an embedding store",
        description=textwrap.dedent("""\
            Write one self-contained HTML file (figures and thumbnails inlined as PNG) about a store: counts,
            failed tiles, quality flags, the class histogram, a sky map and an embedding map coloured by
            class, the most confident examples of each class (cutouts re-made from the tiles), and a
            confusion matrix where the truth is known (simulated surveys: the Tractor catalogs'
            true_class_key, joined by object_id; otherwise skipped with a note)."""),
        epilog=EXAMPLES)
    opt.add_store(p)
    p.add_argument("--out", required=True, metavar="REPORT.html", help="the HTML file to write")
    opt.add_survey(p, help="survey root(s) holding the store's tiles (thumbnails and truth; default: the store's "
                        "survey_roots attribute, then runs/sky)")
    p.add_argument("--examples", type=int, default=6, help="example thumbnails per class (default 6; 0: none)")
    p.add_argument("--truth", default="auto", choices=["auto", "none"],
                   help="auto: confusion matrix from the Tractor catalogs' true classes when present")
    p.add_argument("--max-points", type=int, default=100_000, help="sources drawn on the sky map (random sample)")
    p.set_defaults(func=run)
