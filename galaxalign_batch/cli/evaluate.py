"""`galaxalign-batch evaluate`: zero-shot classification and retrieval metrics of a checkpoint."""

from __future__ import annotations

import argparse
import logging

from galaxalign_batch.cli import _options as opt

log = logging.getLogger("galaxalign_batch")


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.cli._options import UsageError
    from galaxalign_batch.model.evaluate import evaluate_checkpoints
    from galaxalign_batch.model.inputs import resolve_device

    if args.names and len(args.names) != len(args.checkpoints):
        raise UsageError(f"--names gives {len(args.names)} names for {len(args.checkpoints)} checkpoints")
    result = evaluate_checkpoints(args.checkpoints, args.data, args.out, split=args.split, ks=tuple(args.k),
                                  batch_size=args.batch_size, device=str(resolve_device(args.device)), names=args.names,
                                  force_unlock=args.force_unlock, stretch=args.stretch)
    print(result["table_md"], end="")
    log.info("wrote %s/table.md, table.json, metrics.json and confusion matrices", args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="zero-shot classification and retrieval metrics of a checkpoint",
        description="Evaluate one or more checkpoints on the same split: zero-shot classification through text, "
                    "symbol and combined prototypes (the image-only baseline: its linear head), accuracy, macro-F1, "
                    "per-class recall and confusion matrices; same-class retrieval precision@k and mAP@k. Writes "
                    "OUT/table.md, OUT/table.json, OUT/metrics.json and OUT/confusion_*.png. Each checkpoint's own "
                    "preprocessing (CutoutSpec) is applied to the data. See docs/model.md.",
)
    p.add_argument("--checkpoints", nargs="+", required=True, help="model files (.safetensors) or checkpoint directories")
    p.add_argument("--names", nargs="+", default=None, help="row names in the table (default: file names)")
    p.add_argument("--data", required=True, help="labelled data, as for train (the split settings come from the first checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="which split to evaluate")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="k of precision@k and mAP@k")
    p.add_argument("--batch-size", type=int, default=256)
    opt.add_stretch(p, default=None, help="cut the data in this stretch (lupton, asinh, gz-decals) instead of each "
                                          "checkpoint's own: how a model reads pictures another pipeline stretched "
                                          "(survey pixels only: the simulator's labelled set, labels on a store)")
    opt.add_device(p)
    opt.add_force_unlock(p)
    p.set_defaults(func=run)
