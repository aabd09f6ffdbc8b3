"""Training: GalaxAlign's two stages and the two baselines, locally or inside Ray Train workers.

Modes (all run ``epochs_stage1 + epochs_stage2`` epochs by default, so budgets match):

- ``trimodal``: stage 1 sends images and symbols through the shared image encoder and the class
  prompts through the text encoder, with the image-text and symbol-text terms
  (``stage1_weights``, default 1, 0, 1); stage 2 copies the image encoder into a symbol encoder
  and trains all three with the image-text, image-symbol and symbol-text terms (``weights``).
- ``image-text``: plain CLIP fine-tuning on the class prompts (image-text term only).
- ``image-only``: the image encoder plus a linear classifier, cross-entropy.

The contrastive loss is :func:`galaxalign_batch.ops.trimodal_contrastive_loss` with the batch's
class ids (items of the same class are positives, not negatives); with several workers it is the
loss of the global batch (every worker's items are negatives for every other's, see
:mod:`galaxalign_batch.model.loss`), and ``accum_steps`` micro-batches per step are accumulated
with cached features (:func:`galaxalign_batch.model.distributed.step_gradients`). Each epoch ends with a
validation pass, a row in ``metrics.csv`` and a training checkpoint; a run resumes from the
latest checkpoint under its output directory.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model import checkpoint as ckpt
from galaxalign_batch.model.config import TINY, create_clip, tokenizer_for
from galaxalign_batch.model.data import ImageSet, load_dataset
from galaxalign_batch.model.distributed import MicroBatch, broadcast_parameters, step_gradients
from galaxalign_batch.model.evaluate import quick_accuracy
from galaxalign_batch.model.inputs import resolve_device  # noqa: F401  (re-exported: pretrain, evaluate)
from galaxalign_batch.model.galaxalign import MODES, GalaxAlignModel
from galaxalign_batch.model.symbols import SymbolSet
from galaxalign_batch.preprocess import CutoutSpec
from galaxalign_batch.preprocess.spec import check_stretch_augment
from galaxalign_batch.progress import bar
from galaxalign_batch.vocabulary import load_vocabulary

log = logging.getLogger(__name__)

METRIC_FIELDS = ["epoch", "stage", "global_step", "train_loss", "lr", "logit_scale", "val_acc_text", "val_acc_symbol",
                 "val_acc_combined", "val_acc_head", "epoch_seconds", "elapsed_seconds"]
# Settings that must agree between a run and the checkpoint it resumes from.
RESUME_KEYS = ("mode", "model", "pretrained", "data", "vocabulary", "symbols", "align_epochs", "epochs_stage1", "epochs_stage2", "epochs",
               "batch_size", "accum_steps", "seed", "val_fraction", "test_fraction", "limit_per_class", "schedule",
               "withhold_classes", "store", "stretch_augment")
SCHEDULES = ("stage", "run")
PATH_KEYS = ("model", "pretrained", "data", "vocabulary", "symbols", "store")  # compared as resolved paths on resume


@dataclass
class TrainConfig:
    """Every setting of a training run (the CLI's options; defaults documented in docs/model.md)."""

    data: str
    out: str
    mode: str = "trimodal"
    model: str = TINY
    pretrained: str | None = None
    vocabulary: str = "galaxy10"
    symbols: str | None = None
    epochs_stage1: int = 5
    epochs_stage2: int = 5
    epochs: int | None = None              # image-text / image-only; default epochs_stage1 + epochs_stage2
    batch_size: int = 64                   # per worker and micro-batch
    accum_steps: int = 1                   # micro-batches per optimisation step (features cached, GradCache)
    negatives: str = "global"              # global: every worker's items; local: the worker's own batch only
    lr: float | None = None                # default: 1e-3 from random weights, 1e-4 when fine-tuning weights
    lr_stage2: float | None = None         # default: lr
    align_epochs: int = 0                  # first stage: only final norms + projections (+ head) train
    align_lr: float = 1e-2
    weight_decay: float = 0.1
    warmup: float = 0.05                   # fraction of each stage's steps
    schedule: str = "stage"                # stage: warmup + cosine per stage; run: one across stage 1 + stage 2
    withhold_classes: tuple[str, ...] = ()  # class keys whose *images* are dropped from the train split
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)        # stage 2: (w_it, w_is, w_st)
    stage1_weights: tuple[float, float, float] = (1.0, 0.0, 1.0)
    temperature: float | None = None       # initial temperature; None keeps the model's (0.07 when random)
    learn_temperature: bool = True
    train_layers: str = "all"
    loss: str = "auto"                     # ops impl: auto | fused | reference
    workers: int = 0                       # 0: this process; N >= 1: Ray Train with N workers
    device: str = "auto"
    amp: bool = True                       # autocast on CUDA
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    limit_per_class: int | None = None
    angular_size: float = 32.0
    cutout_size: int | None = None         # default: the model's input size
    stretch: str = "lupton"
    stretch_augment: tuple[str, ...] = ()  # other stretches each training image is drawn in at random
    symbol_bank: int = 32                  # augmented symbols per class rendered each epoch
    max_steps_per_epoch: int | None = None
    resume: str = "auto"                   # auto | yes | no
    tensorboard: bool = False
    max_failures: int = 2                  # Ray Train worker-failure retries
    threads: int | None = None             # torch CPU threads of a local run (default: torch's choice)
    store: str | None = None               # data is a label file (object_id,label) of this store's objects
    survey: tuple[str, ...] = ()           # roots where the store's bricks are looked for

    def __post_init__(self) -> None:
        self.weights = tuple(float(w) for w in self.weights)
        self.stage1_weights = tuple(float(w) for w in self.stage1_weights)
        self.withhold_classes = tuple(str(k) for k in (self.withhold_classes or ()))
        self.survey = tuple(str(r) for r in (self.survey or ()))
        self.stretch_augment = check_stretch_augment(self.stretch, self.stretch_augment)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("weights", "stage1_weights"):
            w = getattr(self, name)
            if len(w) != 3 or min(w) < 0 or max(w) == 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be three non-negative numbers w_it,w_is,w_st, "
                                  f"not all 0; got {list(w)}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.resume not in ("auto", "yes", "no"):
            raise ConfigError(f"resume must be auto, yes or no, got {self.resume!r}")
        for name in ("epochs_stage1", "epochs_stage2", "batch_size", "symbol_bank"):
            if int(getattr(self, name)) < (0 if name.startswith("epochs") else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.align_epochs < 0 or self.align_lr <= 0:
            raise ConfigError(f"--align-epochs must be >= 0 and --align-lr > 0, got {self.align_epochs}, {self.align_lr}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if (self.lr is not None and self.lr <= 0) or (self.lr_stage2 is not None and self.lr_stage2 <= 0):
            raise ConfigError("learning rates must be > 0")
        if self.temperature is not None and not 0 < self.temperature < 10:
            raise ConfigError(f"--temperature must be in (0, 10), got {self.temperature}")
        if self.mode == "trimodal" and self.epochs_stage1 + self.epochs_stage2 < 1:
            raise ConfigError("trimodal training needs at least one epoch in stage 1 or stage 2")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if int(self.accum_steps) < 1:
            raise ConfigError(f"--accum-steps must be >= 1, got {self.accum_steps}")
        if self.negatives not in ("global", "local"):
            raise ConfigError(f"--negatives must be global or local, got {self.negatives!r}")

    def batch_layout(self, world_size: int | None = None) -> dict:
        """Items per optimisation step: ``global_batch = workers x batch_size x accum_steps``."""
        workers = world_size if world_size is not None else max(1, self.workers)
        return {"global_batch": workers * self.batch_size * self.accum_steps, "workers": workers,
                "per_worker_batch": self.batch_size * self.accum_steps, "micro_batch": self.batch_size,
                "accum_steps": self.accum_steps, "negatives": self.negatives if workers > 1 else "global"}

    @property
    def starts_from_random_weights(self) -> bool:
        from galaxalign_batch.model.spec import parse_model_spec

        return parse_model_spec(self.model, pretrained=self.pretrained).random_weights

    @property
    def effective_lr(self) -> float:
        """``lr``, or its default: 1e-3 when training from random weights, 1e-4 when fine-tuning weights."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.starts_from_random_weights else 1e-4

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Stage:
    name: str
    epochs: int
    weights: tuple[float, float, float] | None  # None: cross-entropy (image-only)
    lr: float
    layers: str | None = None                   # --train-layers of this stage; None: the run's


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    """The stages of a run; the baselines get the same number of epochs as tri-modal's two stages."""
    total = cfg.epochs if cfg.epochs is not None else cfg.epochs_stage1 + cfg.epochs_stage2
    lr = cfg.effective_lr
    # --align-epochs: a first stage in every mode that trains only the final norms and projections (and the
    # linear head): the new class prompts / symbols meet a foundation's features before those features move.
    first = cfg.stage1_weights if cfg.mode == "trimodal" else (1.0, 0.0, 0.0) if cfg.mode == "image-text" else None
    align = [Stage("align", cfg.align_epochs, first, cfg.align_lr, "proj")] if cfg.align_epochs else []
    if cfg.mode == "trimodal":
        stages = [Stage("stage1", cfg.epochs_stage1, cfg.stage1_weights, lr),
                  Stage("stage2", cfg.epochs_stage2, cfg.weights, cfg.lr_stage2 or lr)]
        return align + [s for s in stages if s.epochs > 0]
    if cfg.mode == "image-text":
        return align + [Stage("image-text", total, (1.0, 0.0, 0.0), lr)]
    return align + [Stage("image-only", total, None, lr)]


@dataclass
class RunContext:
    """Where the training loop runs: this process, or one Ray Train worker."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume_dir: Path | None = None
    checkpoint_root: Path | None = None                      # None: <out>/checkpoints
    report: Callable[[dict, Path | None], None] | None = None  # Ray: ray.train.report
    keep_checkpoints: int = 2

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------- building

def build_model(cfg: TrainConfig) -> GalaxAlignModel:
    """A fresh GalaxAlign model from ``cfg.model`` (:func:`galaxalign_batch.model.spec.parse_model_spec`):
    an open_clip model (name, with a tag or weights file or random) or the weights of one of our checkpoints."""
    from galaxalign_batch.model.checkpoint import lineage_from, load_checkpoint
    from galaxalign_batch.model.spec import model_file, parse_model_spec

    vocab = load_vocabulary(cfg.vocabulary)
    model_spec = parse_model_spec(cfg.model, pretrained=cfg.pretrained)
    if model_spec.kind == "checkpoint":
        base = load_checkpoint(cfg.model)
        clip, oc, pre = base.clip, dict(base.info["open_clip"]), dict(base.info["preprocess"])
        oc["initialised_from"] = str(Path(cfg.model).resolve())
    else:
        clip, oc_cfg, pre = create_clip(model_spec.name, model_spec.weights)
        oc = {"name": model_spec.name, "pretrained": model_spec.weights, "config": oc_cfg}
    size = pre["size"]
    spec = CutoutSpec(angular_size=cfg.angular_size, out_size=cfg.cutout_size or size, stretch=cfg.stretch)
    symbols = (SymbolSet.from_folder(cfg.symbols, vocab, size) if cfg.symbols else SymbolSet.builtin(vocab, size))
    info = {"mode": cfg.mode, "stage": None, "open_clip": oc, "preprocess": pre, "cutout_spec": spec.to_dict()}
    if model_spec.kind == "checkpoint":
        info["lineage"] = lineage_from(base.info, model_file(cfg.model))
    model = GalaxAlignModel(clip, info, tokenizer_for(oc["name"], oc["config"]), vocab, symbols)
    if cfg.temperature is not None:
        with torch.no_grad():
            model.clip.logit_scale.fill_(math.log(1.0 / cfg.temperature))
    if cfg.mode == "image-only":
        model.add_classifier(len(vocab))
    return model


def _param_groups(model: torch.nn.Module, weight_decay: float, also_no_decay: tuple[str, ...] = ()) -> list[dict]:
    """open_clip's rule: no weight decay for 1-D tensors, norms, biases and logit_scale (and for
    parameters whose names contain any of ``also_no_decay``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
                or any(key in name for key in also_no_decay)):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float,
              offset: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` of ``total_steps``, then cosine to 0; the scheduler's step 0 is step
    ``offset`` of that curve (``--schedule run``: stage 2 continues stage 1's curve)."""
    warm = max(1, int(round(total_steps * warmup)))

    def factor(step: int) -> float:
        step += offset
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def augment_images(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random right-angle rotations and mirror flips per image (morphology does not depend on them)."""
    k = rng.integers(0, 4, size=len(x))
    flip = rng.random(len(x)) < 0.5
    out = x.clone()
    for r in range(4):
        sel = np.flatnonzero(k == r)
        if len(sel) and r:
            out[sel] = torch.rot90(out[sel], r, dims=(2, 3))
    sel = np.flatnonzero(flip)
    if len(sel):
        out[sel] = torch.flip(out[sel], dims=(3,))
    return out


class _Prompts:
    """All prompt texts of every class, tokenised once; a batch picks one at random per item."""

    def __init__(self, model: GalaxAlignModel):
        vocab = model.vocabulary
        texts, owner = [], []
        for i in range(len(vocab)):
            for t in vocab.prompts(i):
                texts.append(t)
                owner.append(i)
        self.tokens = model.tokenizer(texts)
        self.by_class = [np.flatnonzero(np.asarray(owner) == i) for i in range(len(vocab))]

    def sample(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique tokens, index of each item's prompt among them)."""
        pick = np.array([rng.choice(self.by_class[c]) for c in labels])
        uniq, inverse = np.unique(pick, return_inverse=True)
        return self.tokens[uniq], torch.from_numpy(inverse.reshape(-1))


class _SymbolBank:
    """Augmented symbols rendered once per epoch; a batch draws one of its class per item."""

    def __init__(self, symbols: SymbolSet, per_class: int, seed: int):
        self.images, labels = symbols.bank(per_class, seed)
        self.by_class = [np.flatnonzero(labels == i) for i in range(len(symbols.keys))]

    def sample(self, labels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        pick = np.array([rng.choice(self.by_class[c]) for c in labels])
        return torch.from_numpy(self.images[pick])


# ---------------------------------------------------------------------------------------------- the loop

def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _resume_point(cfg: TrainConfig, ctx: RunContext, out: Path) -> Path | None:
    if ctx.resume_dir is not None:
        return Path(ctx.resume_dir)
    if cfg.resume == "no":
        return None
    found = ckpt.find_latest(out / "checkpoints")
    if found is None and cfg.resume == "yes":
        raise ConfigError(f"--resume: no training checkpoint under {out / 'checkpoints'}")
    return found


def _same_setting(key: str, saved, current) -> bool:
    if saved == current:
        return True
    if key in PATH_KEYS and isinstance(saved, str) and isinstance(current, str):
        return Path(saved).resolve() == Path(current).resolve()  # a Ray run stores absolute paths
    return False


def check_resumable(cfg: TrainConfig, progress: dict, where: Path) -> None:
    saved = progress.get("config", {})
    diff = [k for k in RESUME_KEYS if k in saved and not _same_setting(k, saved[k], cfg.to_dict()[k])]
    if diff:
        raise ConfigError(f"{where}: checkpoint of a different run ({', '.join(f'{k}={saved[k]!r}' for k in diff)}); "
                          f"use another --out or --no-resume")


def run_training(cfg: TrainConfig, ctx: RunContext | None = None) -> dict:
    """Train per ``cfg`` in the context ``ctx`` (this process by default); returns a summary (on rank 0)."""
    ctx = ctx or RunContext(device=resolve_device(cfg.device))
    out = Path(cfg.out)
    device = ctx.device
    torch.manual_seed(cfg.seed + ctx.rank)
    start = _resume_point(cfg, ctx, out)
    state, progress = ({}, {"epoch": 0, "global_step": 0, "elapsed": 0.0})
    if start is not None:
        model, state, progress = ckpt.load_for_resume(start)
        check_resumable(cfg, progress, start)
        if ctx.is_main:
            log.info("resuming from %s (epoch %d done)", start, progress["epoch"])
    else:
        model = build_model(cfg)
    model.info["training"] = cfg.to_dict()
    model.info["batch"] = layout = cfg.batch_layout(ctx.world_size)
    model.to(device)

    spec = CutoutSpec.from_dict(model.info["cutout_spec"])
    check_stretch_augment(spec.stretch, cfg.stretch_augment)  # the model's own stretch (a checkpoint's spec)
    data = load_dataset(cfg.data, model.vocabulary, spec=spec, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        test_fraction=cfg.test_fraction, limit_per_class=cfg.limit_per_class, store=cfg.store,
                        survey=cfg.survey, stretch_augment=cfg.stretch_augment)
    model.info["data"] = data.description
    train, val = data.split("train"), data.split("val")
    withheld = withheld_ids(cfg, model.vocabulary)
    if withheld:  # zero-shot to unseen classes: their images never train; their text and symbols still do
        train = train.subset(np.flatnonzero(~np.isin(train.labels, withheld)))
        model.info["withheld_classes"] = list(cfg.withhold_classes)
        if ctx.is_main:
            log.info("withholding the images of %s: %d train images left", ", ".join(cfg.withhold_classes), len(train))
    from galaxalign_batch.ops.backends import resolve_impl

    if cfg.mode != "image-only":
        resolve_impl(cfg.loss, device, "trimodal_loss")  # an unavailable --loss fused fails here, not mid-run
    if ctx.is_main:
        log.info("%s training of %s on %d train / %d val images (%s), %d worker(s), device %s", cfg.mode,
                 model.info["open_clip"]["name"], len(train), len(val), data.description["kind"], ctx.world_size, device)
        log.info("effective global batch %d = %d worker(s) x %d per worker (%d accumulation step(s) of %d)%s",
                 layout["global_batch"], layout["workers"], layout["per_worker_batch"], layout["accum_steps"],
                 layout["micro_batch"], f", {layout['negatives']} negatives" if layout["workers"] > 1 else "")
    writer = _MetricsWriter(out, progress["epoch"], cfg.tensorboard) if ctx.is_main else None
    prompts = _Prompts(model)
    done = int(progress["epoch"])
    global_step = int(progress["global_step"])
    elapsed0 = float(progress.get("elapsed", 0.0))
    t_run = time.perf_counter()
    epoch_base = 0
    last_val: dict = {}
    total_epochs = sum(s.epochs for s in plan_stages(cfg))
    main_epochs = sum(s.epochs for s in plan_stages(cfg) if s.name != "align")  # --schedule run spans these
    previous_optimizer = None
    epochs_bar = bar(total=total_epochs, desc=cfg.mode, unit="epoch", initial=done) if ctx.is_main else None
    for stage in plan_stages(cfg):
        if done >= epoch_base + stage.epochs:
            epoch_base += stage.epochs
            continue
        if stage.name == "stage2" and model.symbol_encoder is None:
            model.init_symbol_encoder()
            model.to(device)
        model.info["stage"] = stage.name
        n_trainable = model.set_trainable(stage.layers or cfg.train_layers, text=stage.weights is not None,
                                          temperature=cfg.learn_temperature and stage.weights is not None)
        steps = _steps_per_epoch(len(train), cfg, ctx)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=stage.lr, betas=(0.9, 0.98), eps=1e-6)
        if cfg.schedule == "run" and stage.name != "align":
            # one warmup + cosine over stage 1 and stage 2 together; stage 2 keeps stage 1's AdamW moments for
            # the weights the two share (the new symbol encoder's start at zero)
            mains = [s for s in plan_stages(cfg) if s.name != "align"]
            before = sum(s.epochs for s in mains[:[s.name for s in mains].index(stage.name)])
            scheduler = _schedule(optimizer, steps * main_epochs, cfg.warmup, offset=steps * before)
            if previous_optimizer is not None:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p in previous_optimizer.state:
                            optimizer.state[p] = previous_optimizer.state[p]
        else:
            scheduler = _schedule(optimizer, steps * stage.epochs, cfg.warmup)
        if state.get("stage") == stage.name and done > epoch_base:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        broadcast_parameters(model)  # every worker starts the stage from rank 0's weights
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
        if ctx.is_main:
            log.info("%s: %d epoch(s) of %d step(s), lr %.2g, %d trainable parameters, weights %s", stage.name,
                     stage.epochs, steps, stage.lr, n_trainable, stage.weights or "cross-entropy")
        for epoch in range(max(done, epoch_base), epoch_base + stage.epochs):
            t_epoch = time.perf_counter()
            loss = _train_epoch(cfg, ctx, model, optimizer, scheduler, scaler, stage, train, prompts, epoch, steps)
            global_step += steps
            done = epoch + 1
            metrics = {"epoch": done, "stage": stage.name, "global_step": global_step, "train_loss": loss,
                       "lr": optimizer.param_groups[0]["lr"], "logit_scale": model.logit_scale.item(),
                       "epoch_seconds": round(time.perf_counter() - t_epoch, 2)}
            ckpt_dir = None
            if ctx.is_main:
                last_val = quick_accuracy(model, val.images, val.labels)
                metrics.update({f"val_acc_{k}": v for k, v in last_val.items()})
                metrics["elapsed_seconds"] = round(elapsed0 + time.perf_counter() - t_run, 1)
                model.info["train_seconds"] = metrics["elapsed_seconds"]
                lease.check_held(out)  # a run whose lease was taken (--force-unlock) stops before it writes again
                writer.write(metrics)
                ckpt_dir = _save_epoch(ctx, out, model, optimizer, scheduler, stage, cfg, done, global_step,
                                       metrics["elapsed_seconds"])
                log.info("epoch %d/%d %s: loss %.4f, val acc %s, %.1fs", done, total_epochs,
                         stage.name, loss, {k: round(v, 3) for k, v in last_val.items()}, metrics["epoch_seconds"])
                epochs_bar.set_postfix(loss=f"{loss:.3f}", **{f"val_{k}": f"{v:.3f}" for k, v in last_val.items()})
                epochs_bar.update(1)
            if ctx.report is not None:
                ctx.report(metrics, ckpt_dir)
        if stage.name == "stage1" and ctx.is_main and cfg.epochs_stage2 > 0:
            lease.check_held(out)
            ckpt.save_model(model, out / "model_stage1.safetensors")
        epoch_base += stage.epochs
        previous_optimizer = optimizer if stage.name != "align" else None
    summary = {}
    if ctx.is_main:
        model.info["stage"] = plan_stages(cfg)[-1].name
        if last_val == {}:
            last_val = quick_accuracy(model, val.images, val.labels)
        elapsed = round(elapsed0 + time.perf_counter() - t_run, 1)
        model.info["train_seconds"] = elapsed
        lease.check_held(out)
        final = ckpt.save_model(model, out / "model.safetensors")
        summary = {"model": str(final), "epochs": done, "global_step": global_step, "seconds": elapsed,
                   "val_accuracy": last_val, "train_images": len(train), "val_images": len(val),
                   "workers": ctx.world_size, "batch": layout, "resumed_from": str(start) if start else None,
                   "device": str(device), "config": cfg.to_dict()}
        atomic.write_json(out / "train_summary.json", summary)
        writer.close()
        epochs_bar.close()
    return summary


def withheld_ids(cfg: TrainConfig, vocabulary) -> list[int]:
    """Class indices of ``cfg.withhold_classes`` (keys of the vocabulary); an unknown key is an error."""
    ids = []
    for key in cfg.withhold_classes:
        if key not in vocabulary.keys:
            raise ConfigError(f"--withhold-classes: {key!r} is not a class of the vocabulary ({', '.join(vocabulary.keys)})")
        ids.append(vocabulary.keys.index(key))
    if ids and len(ids) >= len(vocabulary.keys):
        raise ConfigError("--withhold-classes: at least one class must keep its images")
    return ids


def _steps_per_epoch(n_train: int, cfg: TrainConfig, ctx: RunContext) -> int:
    per_worker = n_train // ctx.world_size
    if per_worker < 2 * cfg.accum_steps:
        raise ConfigError(f"the train split has {n_train} images: too few for {ctx.world_size} worker(s)"
                          + (f" x {cfg.accum_steps} accumulation steps" if cfg.accum_steps > 1 else ""))
    steps = max(1, per_worker // (cfg.batch_size * cfg.accum_steps))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def _train_epoch(cfg, ctx, model, optimizer, scheduler, scaler, stage, train: ImageSet, prompts, epoch, steps) -> float:
    device = ctx.device
    rng = np.random.default_rng([cfg.seed, epoch, ctx.rank])
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))[ctx.rank::ctx.world_size]
    accum = cfg.accum_steps
    bsz = min(cfg.batch_size, len(order) // accum)  # micro-batch; a step takes accum of them
    bank = None
    if stage.weights is not None and (stage.weights[1] or stage.weights[2]):
        bank_seed = int(np.random.SeedSequence([cfg.seed, epoch, ctx.rank, 1]).generate_state(1)[0])
        bank = _SymbolBank(model.symbols, cfg.symbol_bank, seed=bank_seed)
    # --withhold-classes: the batches hold no image (so no symbol or prompt) of a withheld class; a symbol-text
    # term over EXTRA_PER_CLASS symbols and prompts of every class keeps their text and symbols in training
    extra_labels = None
    if cfg.withhold_classes and bank is not None and stage.weights[2]:
        extra_labels = np.repeat(np.arange(len(model.vocabulary)), EXTRA_PER_CLASS)
    model.train()
    total, count = 0.0, 0
    pbar = bar(range(steps), total=steps, desc=f"{stage.name} epoch {epoch + 1}", unit="step", leave=False) \
        if ctx.is_main else range(steps)
    for step in pbar:
        micro = []
        for k in range(accum):
            start = (step * accum + k) * bsz
            idx = order[start:start + bsz]
            labels_np = train.labels[idx]
            mb = MicroBatch(images=model.prepare_images(augment_images(train.batch(idx, rng), rng)),
                            labels=torch.from_numpy(labels_np).to(device))
            if stage.weights is not None:
                mb.symbols = model.prepare_images(bank.sample(labels_np, rng)) if bank is not None else None
                tokens, inverse = prompts.sample(labels_np, rng)
                mb.tokens, mb.inverse = tokens.to(device), inverse.to(device)
            micro.append(mb)
        optimizer.zero_grad(set_to_none=True)
        extra = 0.0
        if extra_labels is not None:  # its gradients join the step's (step_gradients accumulates, then averages)
            extra = _symbol_text_gradients(cfg, model, bank, prompts, extra_labels, stage.weights[2], rng, scaler,
                                           device)
        loss = step_gradients(model, micro, weights=stage.weights, impl=cfg.loss, negatives=cfg.negatives,
                              scaler=scaler, autocast=lambda: _autocast(device, cfg.amp))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        model.clamp_logit_scale()
        value = loss.item() + extra
        if not math.isfinite(value):
            raise ConfigError(f"training diverged (loss {value}) at epoch {epoch + 1} step {step + 1}; lower --lr")
        total += value
        count += 1
        if ctx.is_main and hasattr(pbar, "set_postfix"):
            pbar.set_postfix(loss=f"{total / count:.3f}")
    return total / max(count, 1)


EXTRA_PER_CLASS = 2


def _symbol_text_gradients(cfg, model, bank, prompts, labels: np.ndarray, weight: float, rng, scaler, device) -> float:
    """Backward of ``weight * L(symbol, text)`` over one symbol and prompt per entry of ``labels`` (every class,
    withheld ones included); returns the loss value. Symbols go through the symbol encoder (stage 2) or the
    shared image encoder (align, stage 1), as in the main term."""
    from galaxalign_batch.ops import trimodal_contrastive_loss

    symbols = model.prepare_images(bank.sample(labels, rng))
    tokens, inverse = prompts.sample(labels, rng)
    with _autocast(device, cfg.amp):
        out = model(symbols=symbols, tokens=tokens.to(device))
        text = out["text"].float()[inverse.to(device)]
        loss = trimodal_contrastive_loss(None, text, out["symbol"].float(), model.logit_scale.float(),
                                         class_ids=torch.from_numpy(labels).to(device), weights=(0.0, 0.0, weight),
                                         impl=cfg.loss)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return float(loss.detach())


def _save_epoch(ctx: RunContext, out: Path, model, optimizer, scheduler, stage: Stage, cfg: TrainConfig, epoch: int,
                global_step: int, elapsed: float) -> Path:
    root = ctx.checkpoint_root or (out / "checkpoints")
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "stage": stage.name}
    progress = {"epoch": epoch, "global_step": global_step, "stage": stage.name, "elapsed": elapsed,
                "config": cfg.to_dict()}
    d = ckpt.save_training_checkpoint(root / f"epoch_{epoch:04d}", model, state, progress)
    if ctx.checkpoint_root is None:  # local runs keep the last few; Ray keeps its own (CheckpointConfig)
        ckpt.prune(root, "epoch_*", keep=ctx.keep_checkpoints)
    return d


class _MetricsWriter:
    """``metrics.csv`` (rows of later epochs than the resume point are dropped) and optional TensorBoard."""

    def __init__(self, out: Path, resume_epoch: int, tensorboard: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.csv"
        rows = []
        if resume_epoch and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        with atomic.replacing(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, metrics: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()})
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, metrics["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
