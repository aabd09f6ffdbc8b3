"""`galaxalign-batch classify`: a class for every source of an embedding store, written into the store."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch classify --store runs/sky-embeddings.zarr --model runs/train/model.safetensors
  galaxalign-batch classify --store sky.zarr --model ckpt/ --method text      # text prototypes only
  galaxalign-batch classify --store sky.zarr --model baseline.safetensors --method head --survey runs/sky
"""


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.downstream.classify import classify_store, missing_model_error, scorer_from_checkpoint
    from galaxalign_batch.store import open_readable
    from galaxalign_batch.lease import locked

    store = open_readable(args.store)
    if not args.model:
        raise missing_model_error(store)
    from galaxalign_batch.model.inputs import resolve_device

    device = str(resolve_device(args.device))
    with locked(args.store, args.force_unlock):  # one writer per store: refuse before loading the model
        scorer = scorer_from_checkpoint(args.model, store, args.method, device=device, roots=args.survey)
        summary = classify_store(args.store, scorer, batch_rows=args.batch_rows, force=args.force,
                                 address=args.address)
    for line in summary.lines():
        print(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "classify", help="classify every source of an embedding store (zero-shot or the linear head)",
        description=textwrap.dedent("""\
            Classify every row of an embedding store and write `probs` (N x K), `label` and `confidence`
            into it. Zero-shot methods score the stored embeddings against the checkpoint's text and/or
            symbol class prototypes (fused kernel); `head` runs the image-only baseline's linear head on
            cutouts re-made from the tiles. Resumable (a killed run continues where it stopped) and
            idempotent (a store already classified by the same model and method is left alone); the
            previous classification stays visible until the new one is complete. The store keeps no
            weights: pass the checkpoint it was embedded with; any other is refused."""),
        epilog=EXAMPLES)
    opt.add_store(p)
    p.add_argument("--model", metavar="CKPT",
                   help="the GalaxAlign checkpoint (model.safetensors or its folder) the store was embedded with")
    p.add_argument("--method", default="auto", choices=["auto", "combined", "text", "symbol", "head"],
                   help="prototypes to score against, or the linear head; auto: combined (tri-modal), text "
                        "(image-text), head (image-only) (default: auto)")
    opt.add_survey(p, help="survey root(s) holding the store's tiles (only --method head reads tiles)")
    opt.add_batch_rows(p)
    opt.add_device(p)
    opt.add_force(p)
    opt.add_force_unlock(p)
    opt.add_address(p, help="score the row batches as Ray tasks on this cluster ('auto' or host:port; 'local': a "
                            "private local Ray instance); this process writes them into the store. Default: here")
    p.set_defaults(func=run)
