"""Training the detection head and the Faster R-CNN baseline on simulated fields, on one budget rule.

Both detectors see the same fields in the same order: ``steps`` optimizer steps of ``batch_size``
fields drawn epoch by epoch from one seeded permutation (``seed``), whatever the model, so a head and
an R-CNN trained with the same settings differ only by the model (no augmentation: the head's
encoder tokens are computed once per field). AdamW, linear warm-up over ``warmup`` of the steps, then
cosine decay to 0; gradient norm clipped at 5. Learning rates: ``lr`` for the head (its trainable
layers; the encoder is frozen), ``rcnn_lr`` for the R-CNN (every layer, from random weights).
``precision="bf16"`` runs the forward passes under CPU/CUDA bf16 autocast (the head's loss in fp32,
the R-CNN's as torchvision computes it); weights, gradients and the optimizer stay fp32. On a CPU with
AVX512-BF16 (AMD EPYC Zen 4) it made an R-CNN step 1.6x faster on 1 thread and 1.4x on 2, the head's
1.6x (docs/detection.md); CPUs without it were not measured, and ``"auto"`` keeps fp32 there.
A budget in epochs is :func:`steps_for_epochs`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from galaxalign_batch.detection.fields import FieldSet, normalise
from galaxalign_batch.detection.head import DetectionHead, DetectorConfig, loss, targets
from galaxalign_batch.detection.rcnn import RCNNConfig, RCNNDetector, rcnn_targets
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.progress import bar
from galaxalign_batch.model.precision import PRECISIONS, autocast
from galaxalign_batch.model.tokens import FoundationEncoder

log = logging.getLogger(__name__)

KINDS = ("head", "rcnn")
def steps_for_epochs(epochs: float, n_fields: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_fields`` fields in batches of ``batch_size``."""
    if epochs <= 0 or n_fields < 1 or batch_size < 1:
        raise ConfigError(f"bad budget: {epochs} epochs of {n_fields} fields in batches of {batch_size}")
    return max(1, math.ceil(epochs * n_fields / batch_size))


@dataclass
class DetectTrainSettings:
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3            # the head
    rcnn_lr: float = 2e-4       # the R-CNN
    weight_decay: float = 1e-4
    warmup: float = 0.05
    seed: int = 0
    width: int = 24
    features: bool = True       # head: use the foundation's tokens (False: the pixel-only ablation)
    precision: str = "fp32"     # or "bf16": forward passes under autocast

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.rcnn_lr <= 0 or not 0 <= self.warmup < 1:
            raise ConfigError(f"bad detector training settings: steps {self.steps}, batch_size {self.batch_size}, "
                              f"lr {self.lr}, rcnn_lr {self.rcnn_lr}, warmup {self.warmup}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r} (one of {', '.join(PRECISIONS)})")


@dataclass
class DetectTrainResult:
    model: torch.nn.Module
    kind: str
    losses: list[float] = field(default_factory=list)       # per step (total)
    parts: list[dict] = field(default_factory=list)         # per step, each loss term
    seconds: float = 0.0
    token_seconds: float = 0.0

    def record(self, fields: FieldSet, s: DetectTrainSettings) -> dict:
        """What goes into the detector file's description as ``training``."""
        n = len(self.losses)
        tail = self.losses[-max(1, n // 10):]
        return {"kind": self.kind, "fields": len(fields), "field_px": fields.size, "steps": s.steps,
                "batch_size": s.batch_size, "lr": s.lr if self.kind == "head" else s.rcnn_lr, "seed": s.seed,
                "precision": s.precision,
                "seconds": round(self.seconds, 1), "final_loss": float(np.mean(tail)) if tail else None,
                "tiles": sorted(set(str(t) for t in fields.origin["brick"]))}


def batches(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches through epochs of a seeded permutation of ``range(n)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 41]))
    out, perm, pos = [], rng.permutation(n), 0
    for _ in range(steps):
        idx = []
        while len(idx) < batch_size:
            if pos == len(perm):
                perm, pos = rng.permutation(n), 0
            take = min(batch_size - len(idx), len(perm) - pos)
            idx.extend(perm[pos:pos + take])
            pos += take
        out.append(np.asarray(idx, np.int64))
    return out


def _schedule(opt: torch.optim.Optimizer, s: DetectTrainSettings, base: float):
    warm = max(1, int(round(s.warmup * s.steps)))

    def lr_at(step: int) -> float:
        if step < warm:
            return base * (step + 1) / warm
        t = (step - warm) / max(1, s.steps - warm)
        return base * 0.5 * (1 + math.cos(math.pi * t))

    def set_lr(step: int) -> None:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
    return set_lr


def train_detector(kind: str, fields: FieldSet, settings: DetectTrainSettings | None = None, *,
                   encoder: FoundationEncoder | None = None, device: str | torch.device = "cpu",
                   progress: bool = True,
                   on_step: Callable[[int, torch.nn.Module], None] | None = None) -> DetectTrainResult:
    """Train a detection head (``kind="head"``; ``encoder`` needed when ``settings.features``) or the
    Faster R-CNN (``"rcnn"``) on ``fields`` (their ``inside`` truth boxes).

    ``on_step(steps_done, model)``, when given, is called after every optimizer step (e.g. to evaluate
    held-out fields now and then); the model is put back in training mode after it."""
    s = settings or DetectTrainSettings()
    if kind not in KINDS:
        raise ConfigError(f"unknown detector kind {kind!r} (one of {', '.join(KINDS)})")
    if len(fields) == 0:
        raise ConfigError("no training fields")
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    boxes = [fields.boxes(i) for i in range(len(fields))]
    norm = torch.from_numpy(normalise(fields.images, fields.sigma))
    tokens = None
    token_seconds = 0.0
    if kind == "head":
        use = s.features
        if use and encoder is None:
            raise ConfigError("the detection head with foundation features needs the encoder (--model)")
        cfg = DetectorConfig(width=s.width, feature_dim=encoder.width if use else 0,
                             angular_size=encoder.spec.angular_size if use else 32.0,
                             pixscale=fields.pixscale, field=fields.size)
        model = DetectionHead(cfg, encoder if use else None).to(device)
        if use:
            t1 = time.perf_counter()
            tokens = encoder.to(device).tokens(fields.images, fields.pixscale).cpu()
            token_seconds = time.perf_counter() - t1
        params, base = model.trainable_parameters(), s.lr
    else:
        model = RCNNDetector(RCNNConfig(field=fields.size, pixscale=fields.pixscale)).to(device)
        params, base = [p for p in model.parameters() if p.requires_grad], s.rcnn_lr
    opt = torch.optim.AdamW(params, lr=base, weight_decay=s.weight_decay)
    set_lr = _schedule(opt, s, base)
    result = DetectTrainResult(model, kind, token_seconds=token_seconds)
    model.train()
    plan = batches(len(fields), s.steps, s.batch_size, s.seed)
    it = bar(enumerate(plan), total=len(plan), desc=f"training {kind}", unit="step") if progress else enumerate(plan)
    dev_type = torch.device(device).type

    def amp():
        return autocast(s.precision, dev_type)

    for step, idx in it:
        set_lr(step)
        x = norm[idx].to(device)
        if kind == "head":
            tgt = {k: v.to(device) for k, v in targets([boxes[i] for i in idx], fields.size, fields.size).items()}
            with amp():
                out = model(x, tokens[idx].to(device) if tokens is not None else None)
            parts = loss(tuple(o.float() for o in out), tgt)
            total = parts["total"]
        else:
            tg = [{k: v.to(device) for k, v in t.items()} for t in rcnn_targets([boxes[i] for i in idx])]
            with amp():
                parts = model(list(x), tg)
            parts = {k: v.float() for k, v in parts.items()}
            total = sum(parts.values())
            parts = dict(parts, total=total)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        result.losses.append(float(total.detach()))
        result.parts.append({k: round(float(v.detach()), 5) for k, v in parts.items()})
        if step % 25 == 0 or step == s.steps - 1:
            log.info("%s step %d/%d: loss %.4f", kind, step + 1, s.steps, result.losses[-1])
        if on_step is not None:
            on_step(step + 1, model)
            model.train()
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
