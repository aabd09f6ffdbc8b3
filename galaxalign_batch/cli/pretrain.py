"""`galaxalign-batch pretrain`: label-free pretraining of a foundation model on survey sources."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from galaxalign_batch.cli import _options as opt

log = logging.getLogger("galaxalign_batch")


_pair = opt.loss_weights("w_ii", "w_ic")


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.model.pretrain import PretrainConfig, expand_foundation, export_foundation, pretrain

    if args.expand:
        if args.tiles:
            raise opt.UsageError("--expand FILE turns a compact foundation into a checkpoint: --tiles does not apply")
        path = expand_foundation(args.expand, Path(args.out) / "model.safetensors")
        print(f"foundation {args.expand} -> {path}")
        return 0
    if not args.tiles:
        raise opt.UsageError("pretrain needs --tiles PATH ... (or --expand FILE)")
    cfg = PretrainConfig(
        tiles=args.tiles, out=args.out, model=args.model, pretrained=args.pretrained, bricks=args.bricks,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, weights=args.weights, temperature=args.temperature, angular_size=args.angular_size,
        stretch=args.stretch, stretch_augment=args.stretch_augment, buffer=args.buffer,
        galaxies_only=args.galaxies_only, max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads, device=args.device,
        workers=args.workers,
        resume="yes" if args.resume else "no" if args.no_resume else "auto")
    summary = pretrain(cfg, force_unlock=args.force_unlock)
    if args.export:
        summary["export"] = export_foundation(summary["model"], args.export)
    print(json.dumps({k: summary[k] for k in ("model", "global_step", "total_steps", "seconds", "sources", "tiles",
                                              "workers", "global_batch", "last_loss", "export") if k in summary},
                     indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a foundation model on unlabelled survey sources (no class labels)",
        description="Label-free pretraining of an open_clip model on the sources of survey tiles, read exactly as "
                    "'embed' reads them: two augmented views of each source (image-image contrastive) and a caption "
                    "generated from its Tractor catalogue columns (image-caption contrastive). Writes "
                    "OUT/model.safetensors, which 'train --model', 'embed --model' and 'classify' accept, and "
                    "checkpoints under OUT/checkpoints (a rerun resumes). See docs/model.md.")
    opt.add_tiles(p, help="tiles as for embed: files, folders, globs, @list.txt, Legacy Survey roots")
    opt.add_bricks(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--model", default="galaxalign-tiny",
                   help="open_clip model name, or one of our checkpoints (.safetensors) to continue from")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs its cache) or a local weights file")
    p.add_argument("--epochs", type=int, default=20, help="passes over the tiles (the schedule spans them)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (a rerun with a larger value continues the same schedule)")
    p.add_argument("--batch-size", type=int, default=64, help="sources per step and worker (two views each)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (warmup + cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps")
    p.add_argument("--weights", type=_pair, default=(1.0, 1.0),
                   help="loss weights w_ii,w_ic (image-image views, image-caption per view)")
    p.add_argument("--temperature", type=float, default=0.1, help="initial temperature (learned)")
    opt.add_angular_size(p)
    opt.add_stretch(p)
    opt.add_stretch_augment(p, help="other stretches (asinh, gz-decals, lupton) each source is also cut in; each of "
                                    "its two views is drawn in one of the stretches at random, so the image-image "
                                    "term teaches the foundation that a galaxy is the same galaxy in another "
                                    "picture convention (docs/model.md); memory: one more buffer per stretch")
    p.add_argument("--buffer", type=int, default=20000, help="sources held in memory at once (whole tiles, shuffled)")
    p.add_argument("--galaxies-only", action="store_true", help="skip catalogue rows of type PSF/DUP (stars)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between training checkpoints")
    opt.add_seed(p, help="seed of order, views and initialisation")
    opt.add_threads(p, help="torch CPU threads (1 is fastest on a busy machine)")
    opt.add_train_workers(p, what="a step's global batch is workers x batch-size sources; each worker reads and "
                                  "cuts only its share of the tiles")
    opt.add_device(p)
    p.add_argument("--export", metavar="FILE",
                   help="also write the result as a compact foundation file (float16, only the token-embedding rows "
                        "pretraining changed; ~3.5 MB for galaxalign-tiny)")
    p.add_argument("--expand", metavar="FILE",
                   help="do not train: turn a compact foundation FILE into OUT/model.safetensors (a checkpoint that "
                        "train --model accepts)")
    opt.add_resume(p)
    opt.add_force_unlock(p)
    p.set_defaults(func=run)
