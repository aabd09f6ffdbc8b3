"""`galaxalign-batch detect`: a learned detector applied to survey tiles (a FITS catalogue), or trained
(``--train``) on the fields of a simulated survey (docs/detection.md)."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch simulate --out sky --bricks 4 --size 2048
  galaxalign-batch detect --train --tiles sky --model galaxalign_batch/data/foundation-tiny.safetensors \\
      --out detector.safetensors --fields 1000 --epochs 12 --threads 1
  galaxalign-batch detect --train --tiles sky --detector rcnn --out rcnn.safetensors --fields 1000 --epochs 12
  galaxalign-batch detect --tiles /data/dr10/south --bricks 1501p022 --model detector.safetensors --out catalog.fits
  galaxalign-batch detect --tiles 'cutouts/*.fits' --model detector.safetensors --out catalog.fits --min-score 0.5
"""

DETECTORS = ["head", "pixels", "rcnn"]
DEFAULT_EPOCHS = 12.0   # bench/RESULTS.md "Learned detection": the head's held-out AP has levelled off by then, the R-CNN's nearly


def run(args: argparse.Namespace) -> int:
    import torch

    from galaxalign_batch.model.inputs import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bricks and not args.tiles:
        raise opt.UsageError("--bricks selects bricks of a --tiles survey root")
    device = str(resolve_device(args.device))
    if args.train:
        return _train(args, device)
    if args.detector is not None or args.fields is not None or args.steps is not None or args.epochs is not None:
        raise opt.UsageError("--detector, --fields, --steps and --epochs are for --train")
    if not args.model:
        raise opt.UsageError("--model: the detector file to apply (written by detect --train)")
    from galaxalign_batch.detection.apply import detect_tiles

    summary = detect_tiles(args.tiles, args.model, args.out, bricks=args.bricks, device=device,
                           window=args.window, margin=args.margin, min_score=args.min_score, force=args.force,
                           precision=args.precision or "auto")
    for line in summary.lines():
        print(line)
    return 3 if summary.failed else 0


def _train(args: argparse.Namespace, device: str) -> int:
    import os

    from galaxalign_batch.detection.fields import cut_fields
    from galaxalign_batch.detection.files import save_detector
    from galaxalign_batch.model.precision import resolve_precision
    from galaxalign_batch.model.tokens import load_token_encoder
    from galaxalign_batch.detection.train import (DetectTrainSettings, steps_for_epochs,
                                                  train_detector)

    detector = args.detector or "head"
    if args.steps is not None and args.epochs is not None:
        raise opt.UsageError("give the budget as --steps or as --epochs, not both")
    if detector == "head" and not args.model:
        raise opt.UsageError("--train of the detection head needs --model: the foundation (a checkpoint or a "
                             "compact foundation file)")
    if detector != "head" and args.model:
        raise opt.UsageError(f"--detector {detector} does not use a foundation: leave out --model")
    if len(args.tiles) != 1 or not os.path.isdir(args.tiles[0]):
        raise opt.UsageError("--train takes one --tiles folder: a simulated survey (galaxalign-batch simulate)")
    if os.path.exists(args.out) and not args.force:
        raise opt.UsageError(f"{args.out} exists (--force replaces it)")
    if args.window is not None:
        raise opt.UsageError("--window is for applying a detector; --field sets the training fields' side")
    fields = cut_fields(args.tiles[0], args.bricks, size=args.field, limit=args.fields)
    steps = args.steps if args.steps is not None else steps_for_epochs(
        DEFAULT_EPOCHS if args.epochs is None else args.epochs, len(fields), args.batch_size)
    s = DetectTrainSettings(steps=steps, batch_size=args.batch_size, seed=args.seed, features=detector == "head",
                            precision=resolve_precision(args.precision or "auto", device))
    encoder = load_token_encoder(args.model) if detector == "head" else None
    res = train_detector("rcnn" if detector == "rcnn" else "head", fields, s, encoder=encoder, device=device)
    save_detector(res.model, args.out, {"training": res.record(fields, s)})
    tail = res.losses[-max(1, len(res.losses) // 10):]
    print(f"{args.out}: {detector} detector trained on {len(fields)} fields of {fields.size} px, {s.steps} steps "
          f"of {s.batch_size} ({s.steps * s.batch_size / len(fields):.1f} epochs, {s.precision}) in "
          f"{res.seconds:.1f} s (final loss {sum(tail) / len(tail):.3f})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "detect", help="find sources in tiles with a learned detector, or train one (docs/detection.md)",
        description=textwrap.dedent("""\
            Apply a learned detector (--model DETECTOR.safetensors, written by detect --train) to every tile
            of --tiles and write one catalogue --out (FITS table: object_id, tile, ra, dec, x, y, box = x0, y0,
            x1, y1 in 0-based tile pixels, score, flux_r). A tile is resampled to the detector's pixel scale
            when it differs, cut into overlapping windows of the training fields' size (--window), each window
            keeps the detections centred in its core (--margin px in from inner borders), and overlapping
            boxes are merged (NMS at IoU 0.5). Detections below --min-score are dropped.

            With --train: cut fields from the simulated survey --tiles (its truth catalogues give the boxes)
            and train --detector: 'head' (default; a centre-heatmap + size head on the frozen foundation
            --model's patch tokens), 'pixels' (the same head without the foundation) or 'rcnn' (torchvision
            Faster R-CNN ResNet-50-FPN from random weights); --out is the detector file."""),
        epilog=EXAMPLES)
    opt.add_tiles(p, required=True)
    opt.add_bricks(p)
    p.add_argument("--model", metavar="FILE",
                   help="applying: the detector file; --train: the foundation (checkpoint or compact foundation file)")
    p.add_argument("--out", required=True, metavar="FILE", help="catalogue.fits, or with --train the detector file")
    p.add_argument("--min-score", type=float, default=0.3, metavar="S", help="lowest score kept")
    p.add_argument("--window", type=int, default=None, metavar="PX",
                   help="window side in pixels (default: the detector's training field)")
    p.add_argument("--margin", type=int, default=16, metavar="PX", help="pixels of each window's inner borders not kept")
    p.add_argument("--train", action="store_true", help="train a detector on a simulated survey instead")
    p.add_argument("--detector", choices=DETECTORS, default=None,
                   help="--train: head (on the foundation; the default), pixels (the head without it) or rcnn")
    p.add_argument("--fields", type=int, default=None, metavar="N", help="--train: at most this many fields (default: all)")
    p.add_argument("--field", type=int, default=128, metavar="PX", help="--train: field side in pixels")
    p.add_argument("--epochs", type=float, default=None, metavar="E",
                   help=f"--train: passes over the fields (default {DEFAULT_EPOCHS:g})")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="--train: optimizer steps instead of --epochs")
    opt.add_precision(p, default=None, help="forward passes (training, or a head detector applied; Faster R-CNN is "
                                            "applied in fp32) in fp32 or under bf16 autocast (default auto: bf16 "
                                            "where the CPU has AVX512-BF16 or the GPU bf16)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="--train: fields per step")
    opt.add_seed(p)
    opt.add_threads(p, help="torch CPU threads (1 is fastest on a busy machine)")
    opt.add_device(p)
    opt.add_force(p, help="replace --out if it exists")
    p.set_defaults(func=run)
