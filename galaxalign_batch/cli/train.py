"""`galaxalign-batch train`: fine-tune a GalaxAlign model (stage 1 and 2) or a baseline."""

from __future__ import annotations

import argparse
import json
import logging

from galaxalign_batch.cli import _options as opt

log = logging.getLogger("galaxalign_batch")


_weights = opt.loss_weights("w_it", "w_is", "w_st")


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.model.launch import train
    from galaxalign_batch.model.train import TrainConfig

    cfg = TrainConfig(
        data=args.data, out=args.out, mode=args.mode, model=args.model, pretrained=args.pretrained,
        vocabulary=args.vocabulary, symbols=args.symbols, epochs_stage1=args.epochs_stage1,
        epochs_stage2=args.epochs_stage2, epochs=args.epochs, batch_size=args.batch_size,
        accum_steps=args.accum_steps, negatives=args.negatives, lr=args.lr,
        lr_stage2=args.lr_stage2, align_epochs=args.align_epochs, align_lr=args.align_lr, weight_decay=args.weight_decay, warmup=args.warmup, weights=args.weights,
        schedule=args.schedule, withhold_classes=tuple(k for k in (args.withhold_classes or "").split(",") if k),
        stage1_weights=args.stage1_weights, temperature=args.temperature, learn_temperature=not args.fixed_temperature,
        train_layers=args.train_layers, loss=args.loss, workers=args.workers, device=args.device, amp=not args.no_amp,
        seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        limit_per_class=args.limit_per_class, angular_size=args.angular_size, cutout_size=args.cutout_size,
        stretch=args.stretch, stretch_augment=args.stretch_augment,
        symbol_bank=args.symbol_bank, max_steps_per_epoch=args.max_steps_per_epoch,
        resume="yes" if args.resume else "no" if args.no_resume else "auto", tensorboard=args.tensorboard,
        threads=args.threads, store=args.store, survey=tuple(args.survey or ()))
    summary = train(cfg, force_unlock=args.force_unlock)
    if summary:
        print(json.dumps({k: summary[k] for k in ("model", "epochs", "global_step", "seconds", "val_accuracy")
                          if k in summary}, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a GalaxAlign model (stage 1 and 2) or a baseline",
        description="Fine-tune an open_clip model so that galaxy images, schematic symbols and class labels share "
                    "one space (--mode trimodal: stage 1 then stage 2), or train a baseline on the same data and "
                    "budget (--mode image-text: CLIP fine-tuning; --mode image-only: image encoder + linear "
                    "classifier). Writes OUT/model.safetensors, OUT/metrics.csv and a checkpoint per epoch under "
                    "OUT/checkpoints (a rerun resumes from it). See docs/model.md.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="the simulator's labelled set (dir with labelled/manifest.json), a dir of class "
                                  "subfolders, a CSV (filepath,label), a Galaxy10 DECaLS .h5, a label file "
                                  "(object_id,label) with --store, or a JSON data spec {\"labels\", \"store\"}")
    opt.add_store(g, required=False,
                  help="with --data LABELS.csv (object_id,label, as 'label --export' writes): the store those objects "
                       "are from; each is cut from the tile the store records for it")
    opt.add_survey(g, help="survey root(s) holding the store's bricks (with --store; repeat for several)")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument("--vocabulary", default="galaxy10", help="built-in vocabulary name or TOML file")
    g.add_argument("--symbols", default=None, help="folder of your own symbol images (one subfolder or file prefix "
                                                   "per class key); default: the built-in drawer")
    opt.add_seed(g, help="seed of splits, order and augmentation")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation share when the source has no splits")
    g.add_argument("--test-fraction", type=float, default=0.1, help="test share when the source has no splits")
    g.add_argument("--limit-per-class", type=int, default=None, help="use at most this many images per class and split")
    g.add_argument("--withhold-classes", default=None, metavar="KEY,KEY",
                   help="class keys whose images are dropped from the train split (zero-shot to unseen classes); "
                        "tri-modal still trains their text and symbols (a symbol-text term over every class)")
    opt.add_angular_size(g, help="cutout side in arcsec (simulated / survey data)")
    g.add_argument("--cutout-size", type=int, default=None, help="cutout side in pixels (default: model input size)")
    opt.add_stretch(g)
    opt.add_stretch_augment(g, help="other stretches (asinh, gz-decals, lupton) each training image is also made "
                                    "in, one version drawn at random per image and step: a model that also knows "
                                    "pictures made by other pipelines (Galaxy Zoo PNGs), at some cost on its own "
                                    "stretch (docs/model.md, 'Stretch augmentation'); survey pixels only (the "
                                    "simulator's labelled set, labels on a store)")
    g = p.add_argument_group("model")
    g.add_argument("--mode", default="trimodal", choices=["trimodal", "image-text", "image-only"])
    g.add_argument("--model", default="galaxalign-tiny",
                   help="open_clip model name (e.g. ViT-B-16) or one of our checkpoints (.safetensors) to start from")
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs its cache) or a local weights file")
    g.add_argument("--train-layers", default="all", help="all | last:N (last N blocks + projections) | proj")
    g.add_argument("--temperature", type=float, default=None,
                   help="initial temperature (default: the model's own; 0.07 for random weights)")
    g.add_argument("--fixed-temperature", action="store_true", help="do not learn the temperature")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs-stage1", type=int, default=5, help="tri-modal stage 1 epochs")
    g.add_argument("--epochs-stage2", type=int, default=5, help="tri-modal stage 2 epochs")
    g.add_argument("--epochs", type=int, default=None,
                   help="baseline epochs (default: epochs-stage1 + epochs-stage2, the same budget)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="images per worker and micro-batch; a step's global batch is workers x batch-size x accum-steps")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches per optimisation step: their features are cached, the loss is taken over all "
                        "of them, then the encoders re-run with gradients one micro-batch at a time (GradCache)")
    g.add_argument("--negatives", default="global", choices=["global", "local"],
                   help="with --workers >= 2: contrast each item with every worker's batch (global, all-gather with "
                        "gradients) or only with its own worker's (local)")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate (warmup + cosine); default 1e-3 from random weights (no "
                        "--pretrained), 1e-4 when fine-tuning pretrained weights or one of our checkpoints")
    g.add_argument("--lr-stage2", type=float, default=None, help="stage 2 learning rate (default: --lr)")
    g.add_argument("--align-epochs", type=int, default=0,
                   help="epochs of a first stage (every mode) that trains only the final norms and projections (and "
                        "the linear head): prompts and symbols meet a foundation's features before those move")
    g.add_argument("--align-lr", type=float, default=1e-2, help="learning rate of the align stage")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of each stage's steps")
    g.add_argument("--schedule", default="stage", choices=["stage", "run"],
                   help="stage: warmup + cosine restarted in each stage; run: one warmup + cosine across tri-modal's "
                        "stage 1 and stage 2 (stage 2 keeps stage 1's AdamW moments); the align stage keeps its own")
    g.add_argument("--weights", type=_weights, default=(1.0, 1.0, 1.0),
                   help="stage 2 loss weights w_it,w_is,w_st (image-text, image-symbol, symbol-text)")
    g.add_argument("--stage1-weights", type=_weights, default=(1.0, 0.0, 1.0), help="stage 1 loss weights w_it,w_is,w_st")
    g.add_argument("--loss", default="auto", choices=["auto", "fused", "reference"],
                   help="contrastive loss implementation (galaxalign_batch.ops)")
    g.add_argument("--symbol-bank", type=int, default=32, help="augmented symbols per class drawn each epoch")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch (quick runs)")
    g = p.add_argument_group("execution")
    opt.add_train_workers(g, what="a step's global batch is workers x batch-size x accum-steps")
    opt.add_device(g)
    opt.add_threads(g, help="torch CPU threads of a local run (default: torch's; 1 is faster on a busy machine)")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    opt.add_resume(g)
    opt.add_force_unlock(g)
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs (needs tensorboard)")
    p.set_defaults(func=run)
