"""Few-shot learning curves: a head on frozen GalaxAlign embeddings vs a ResNet18 trained from scratch.

    python bench/fewshot.py [--json PATH] [--checkpoint CKPT | --encoder NAME=MODEL ...] [--seeds 5]
        [--resnet-seeds 5] [--sizes 10,20,50,100,200,500] [--unseen KEY,KEY,KEY --unseen-sizes 3,6,15,30,60,150]

Data: a fresh simulated labelled set (``simulate_labelled``, seed ``--fewshot-seed``, not the seed the
checkpoint was trained on: refused when they are equal) of ``--pool-per-class`` + ``--test-per-class``
galaxies per Galaxy10 class. Every method sees the same 64-px cutouts (the encoder's CutoutSpec,
cut at the stamp centres as ``train`` and ``embed`` cut them), the same labelled draws and the same
test set. A draw of ``n`` labels is stratified over the 10 classes (``n/10`` each, nested: the draw of
200 contains the draw of 100 for a seed), as an expert labelling a balanced sample would.

Tasks: ``--binary-class`` (default ``merging``) vs rest (binary, 10 % positives: 1 positive at 10
labels) on the same draws, the 10-class Galaxy10 task, and with ``--unseen K1,K2,...`` a multi-class
task among those classes only (draws of ``--unseen-sizes`` labels stratified over them, tested on their
test images). AUC: of the positive class (binary), macro one-vs-rest (multi-class).

Encoders (whose embeddings the heads see): ``--checkpoint CKPT`` (one, named ``galaxalign``) or
``--encoder NAME=MODEL``, repeatable: MODEL is a checkpoint or the word ``foundation`` (the shipped
label-free foundation, ``galaxalign_batch/data/foundation-tiny.safetensors``, expanded into the work
directory as ``pretrain --expand`` does). **Fair few-shot** means the encoder never saw the target
classes' labels: the label-free foundation, or a GalaxAlign fine-tuned with ``train --withhold-classes``
the binary class and the ``--unseen`` classes. The bench reads each checkpoint's ``stage`` and
``withheld_classes`` and records, per encoder and task, whether its training saw labelled images of the
task's classes (``saw_target_labels``); a task marked True is confounded for that encoder.

Methods:
- ``NAME linear`` / ``NAME mlp`` (``linear`` / ``mlp`` with ``--checkpoint``):
  :func:`galaxalign_batch.fewshot.fit_head` on the encoder's embeddings (rounded to float16 as the
  store keeps them);
- ``resnet18``: torchvision ``resnet18(weights=None)``, trained once per draw on its 10-class labels and
  scored on the binary and Galaxy10 tasks (binary: by its probability of the binary class), which gives
  the baseline more label information than the binary head gets and halves its cost; for the unseen
  task a separate ResNet18 per draw on the labels of those classes only. AdamW (lr 1e-3, weight decay
  1e-4, cosine decay), batch ``min(32, n)``, random 90-degree rotations and flips, trained for a fixed
  rule at every size: ``max(--resnet-min-steps, --resnet-epochs x ceil(n / batch))`` steps at the
  encoder's 64-px cutouts (``--resnet-size`` resamples them). The default budget (8 epochs, at least
  20 steps) is what fits 5 seeds in ~25 minutes on 2 shared CPU cores; it is far from a converged
  from-scratch training at 200-500 labels, so the JSON keeps each run's final training accuracy.

Summary: per task, method and size the mean and 95 % t-interval of AUC and accuracy over seeds, and the
labels needed for each target (AUC 0.9, 0.95, 0.99; accuracy 0.8 and 0.9 for the multi-class tasks):
the smallest size whose *mean* reaches it, and per seed the smallest size that seed reaches it at.

ResNet18 results do not depend on the encoder: with ``--work DIR`` they are kept in
``DIR/resnet-cache.json`` (keyed by the few-shot set, task, draw, size and budget) and reused by a later
run comparing other encoders; the JSON says how many came from there.

Without ``--checkpoint`` or ``--encoder`` the tiny GalaxAlign is trained first exactly as
``galaxalign-batch train`` does with the settings of the project's shared run (simulated labelled set
seed 0, 120 per class; trimodal, 6 + 6 epochs, batch 32, lr 1e-3, one thread) -- on all 10 classes,
so the heads' figures from it are confounded (it saw every class's labels).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOUNDATION = ROOT / "galaxalign_batch" / "data" / "foundation-tiny.safetensors"
FEWSHOT_SEED = 20261123
BINARY_CLASS = "merging"
AUC_TARGET = 0.9
TARGETS = (("auc", 0.9), ("auc", 0.95), ("auc", 0.99), ("accuracy", 0.8), ("accuracy", 0.9))
HEADS = ("linear", "mlp")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- inputs

def train_checkpoint(work: Path) -> tuple[Path, dict]:
    """Simulate the training set (seed 0) and train the tiny GalaxAlign as the project's shared run does."""
    from galaxalign_batch.model.launch import train
    from galaxalign_batch.model.train import TrainConfig
    from galaxalign_batch.simulate import simulate_labelled

    t0 = time.perf_counter()
    simulate_labelled(work / "train-sim", seed=0, workers=2)
    t_sim = time.perf_counter() - t0
    cfg = TrainConfig(data=str(work / "train-sim"), out=str(work / "trimodal"), mode="trimodal", epochs_stage1=6,
                      epochs_stage2=6, batch_size=32, lr=1e-3, threads=1, resume="no")
    train(cfg)
    return work / "trimodal" / "model.safetensors", {"simulate_seconds": round(t_sim, 1),
                                                      "train_seconds": round(time.perf_counter() - t0 - t_sim, 1),
                                                      "recipe": "trimodal 6+6 epochs, batch 32, lr 1e-3, seed-0 set"}


def training_seed(ckpt: Path) -> int | None:
    """The simulator seed of the labelled set a checkpoint was trained on, when its manifest is readable."""
    from galaxalign_batch.model.checkpoint import read_info

    manifest = (read_info(ckpt).get("data") or {}).get("manifest")
    try:
        return int(json.loads(Path(manifest).read_text())["params"]["seed"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def simulate_fewshot(work: Path, pool: int, test: int, seed: int) -> dict:
    """The fresh labelled set (not yet cut): pool (labels are drawn from it) and test stamps."""
    from galaxalign_batch.simulate import simulate_labelled

    t0 = time.perf_counter()
    n = pool + test
    manifest = simulate_labelled(work / "fewshot-sim", n_per_class=n, seed=seed, splits=(pool / n, 0.0, test / n),
                                 workers=2)
    return {"manifest": manifest, "keys": manifest["vocabulary"]["keys"],
            "simulate_seconds": round(time.perf_counter() - t0, 1)}


def cut_set(sim: dict, spec) -> dict:
    """The set's pool and test stamps cut to ``spec``'s cutouts: {"pool": (pixels, labels), "test": ...}."""
    from galaxalign_batch.model.data import cut_stamps

    manifest = sim["manifest"]
    out = {}
    for split, name in (("train", "pool"), ("test", "test")):
        with np.load(manifest["files"][split]) as z:
            pixels, _ = cut_stamps(z["flux"], manifest["pixscale"], spec, tuple(manifest["bands"]))
            out[name] = (pixels, z["label"].astype(np.int64))
    return out


def fewshot_set(work: Path, spec, pool: int, test: int, seed: int) -> dict:
    """The fresh labelled set, cut to the checkpoint's cutouts: pool (labels are drawn from it) and test."""
    sim = simulate_fewshot(work, pool, test, seed)
    return {"keys": sim["keys"], "simulate_seconds": sim["simulate_seconds"], **cut_set(sim, spec)}


def expand_shipped_foundation(work: Path) -> Path:
    """The shipped label-free foundation as a checkpoint (``pretrain --expand``), in the work directory."""
    from galaxalign_batch.model.pretrain import expand_foundation

    out = work / "foundation" / "model.safetensors"
    if not out.is_file():
        expand_foundation(FOUNDATION, out)
    return out


def encoder_facts(ckpt: Path, keys: list[str], task_classes: dict[str, list[str]]) -> dict:
    """What an encoder's training saw: its stage, withheld classes and, per task, whether it saw labelled
    images of any of the task's classes (a label-free ``pretrain`` saw none; a fine-tuned model saw every
    class it did not withhold)."""
    from galaxalign_batch.model.checkpoint import read_info

    info = read_info(ckpt)
    stage = info.get("stage")
    withheld = list(info.get("withheld_classes") or [])
    label_free = stage == "pretrain"
    saw = {task: (not label_free) and any(c not in withheld for c in classes) for task, classes in task_classes.items()}
    return {"checkpoint": str(ckpt), "stage": stage, "mode": info.get("mode"), "label_free": label_free,
            "withheld_classes": withheld, "weights_digest": info.get("weights_digest"),
            "training_seed": training_seed(ckpt), "saw_target_labels": saw}


def draws(labels: np.ndarray, sizes: list[int], seed: int, k: int) -> dict[int, np.ndarray]:
    """Nested class-stratified draws of each size from the pool (``size // k`` per class, remainder at random)."""
    rng = np.random.default_rng([FEWSHOT_SEED, 7, seed])
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(k)}
    extra_order = rng.permutation(k)
    out = {}
    for n in sizes:
        per = np.full(k, n // k)
        per[extra_order[: n % k]] += 1
        if any(per[c] > len(order[c]) for c in range(k)):
            raise SystemExit(f"size {n} needs {per.max()} per class; the pool has {min(map(len, order.values()))}")
        out[n] = np.concatenate([order[c][: per[c]] for c in range(k)])
    return out


# ---------------------------------------------------------------------------------------------- methods

def run_head(kind: str, emb_train, y_train, emb_test, y_test, classes, seed: int) -> dict:
    from galaxalign_batch.fewshot import fit_head
    from galaxalign_batch.fewshot.heads import auc_score, expected_calibration_error

    t0 = time.perf_counter()
    head = fit_head(emb_train, y_train, classes, kind=kind, seed=seed)
    fit_s = time.perf_counter() - t0
    p = head.predict_proba(emb_test)
    v = head.validation or {}
    return {"auc": auc_score(p, y_test), "accuracy": float(np.mean(p.argmax(1) == y_test)),
            "ece": expected_calibration_error(p, y_test), "fit_seconds": round(fit_s, 3),
            "cv_auc": v.get("auc"), "cv_accuracy": v.get("accuracy"), "temperature": head.temperature}


def train_resnet(pixels: np.ndarray, y: np.ndarray, k: int, seed: int, epochs: int, min_steps: int,
                 batch: int = 32, size: int | None = None):
    """ResNet18 from scratch under the fixed budget rule (module docstring); returns (model, norm, info)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = _to_float(pixels, size)
    mean = x_all.mean((0, 2, 3), keepdim=True)
    std = x_all.std((0, 2, 3), keepdim=True).clamp_min(1e-3)
    x_all = ((x_all - mean) / std).contiguous(memory_format=torch.channels_last)
    t_all = torch.from_numpy(y)
    n = len(y)
    bs = min(batch, n)
    steps = max(min_steps, epochs * math.ceil(n / bs))
    model = torchvision.models.resnet18(weights=None, num_classes=k).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    order, pos, correct, seen = torch.randperm(n, generator=gen), 0, 0, 0
    last_epoch_from = steps - math.ceil(n / bs)
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        xb = _augment(x_all[idx], gen)
        logits = model(xb)
        loss = F.cross_entropy(logits, t_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= last_epoch_from:
            correct += int((logits.argmax(1) == t_all[idx]).sum())
            seen += len(idx)
    return model, (mean, std, size), {"steps": steps, "batch": bs, "final_train_loss": float(loss.detach()),
                                "last_epoch_train_accuracy": correct / max(seen, 1)}


def _to_float(pixels: np.ndarray, size: int | None = None):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(pixels))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if size and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="area" if size < x.shape[-1] else "bilinear")
    return x


def _augment(x, gen):
    """Random 90-degree rotation and horizontal flip (galaxy classes do not depend on orientation)."""
    import torch

    r = int(torch.randint(4, (1,), generator=gen))
    x = torch.rot90(x, r, dims=(2, 3))
    if int(torch.randint(2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x.contiguous(memory_format=torch.channels_last)


def resnet_probs(model, norm, pixels: np.ndarray, batch: int = 100) -> np.ndarray:
    import torch

    model.eval()
    mean, std, size = norm
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = ((_to_float(pixels[i:i + batch], size) - mean) / std).contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(model(x), 1).numpy())
    return np.concatenate(out)


def run_resnet(pixels_train, labels_train, pixels_test, labels_test, k: int, positive: int | None, seed: int,
               epochs: int, min_steps: int, size: int | None = None) -> dict[str, dict]:
    """One ResNet18 trained on the ``k``-class labels; scored on that task and, with ``positive``, on
    ``positive`` vs rest by P(positive)."""
    from galaxalign_batch.fewshot.heads import auc_score

    t0 = time.perf_counter()
    model, norm, info = train_resnet(pixels_train, labels_train, k, seed, epochs, min_steps, size=size)
    train_s = time.perf_counter() - t0
    p = resnet_probs(model, norm, pixels_test)
    common = {"fit_seconds": round(train_s, 1), "trained_on": f"{k}-class labels", **info}
    out = {"multi": {"auc": auc_score(p, labels_test), "accuracy": float(np.mean(p.argmax(1) == labels_test)),
                     **common}}
    if positive is not None:
        is_pos = (labels_test == positive).astype(np.int64)
        p_pos = p[:, positive].astype(np.float64)
        out["binary"] = {"auc": auc_score(np.stack([1 - p_pos, p_pos], 1), is_pos),
                         "accuracy": float(np.mean((p.argmax(1) == positive) == is_pos)), **common}
    return out


# ---------------------------------------------------------------------------------------------- summary

def _mean_ci(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, and the 95 % t-interval's half width (None for one value), and the standard deviation."""
    if not values:
        return None, None, None
    v = np.asarray(values, dtype=np.float64)
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else None
    return float(v.mean()), (None if half is None else float(half)), float(v.std())


def summarise(runs: list[dict], tasks: list[str], methods: list[str], sizes: dict[str, list[int]] | list[int],
              multi: set[str] | None = None) -> dict:
    out: dict = {}
    for task in tasks:
        out[task] = {}
        task_sizes = sizes[task] if isinstance(sizes, dict) else sizes
        targets = [t for t in TARGETS if t[0] == "auc" or (multi is None or task in multi)]
        for m in methods:
            rows = {}
            for n in task_sizes:
                r = [x for x in runs if x["task"] == task and x["method"] == m and x["size"] == n]
                if not r:
                    continue
                auc_m, auc_h, auc_s = _mean_ci([x["auc"] for x in r if x["auc"] is not None])
                acc_m, acc_h, acc_s = _mean_ci([x["accuracy"] for x in r])
                rows[n] = {"auc_mean": auc_m, "auc_ci95": auc_h, "auc_std": auc_s,
                           "accuracy_mean": acc_m, "accuracy_ci95": acc_h, "accuracy_std": acc_s, "seeds": len(r)}
            if not rows:
                continue
            need = {}
            for metric, level in targets:
                reached = [n for n in task_sizes if n in rows and (rows[n][f"{metric}_mean"] or 0) >= level]
                per_seed = {}
                for seed in sorted({x["seed"] for x in runs if x["task"] == task and x["method"] == m}):
                    hit = [x["size"] for x in runs if x["task"] == task and x["method"] == m and x["seed"] == seed
                           and (x[metric] or 0) >= level]
                    per_seed[seed] = min(hit) if hit else None
                need[f"{metric} {level:g}"] = {"mean_curve": reached[0] if reached else None, "per_seed": per_seed}
            out[task][m] = {"by_size": rows, "labels_for_auc_0.9": need["auc 0.9"]["mean_curve"], "labels_for": need}
    return out


def _cell(r: dict | None) -> str:
    if r is None or r["auc_mean"] is None:
        return "-"
    ci = "" if r["auc_ci95"] is None else f" ± {r['auc_ci95']:.3f}"
    return f"{r['auc_mean']:.3f}{ci} / {r['accuracy_mean']:.3f}"


def table(summary: dict, sizes: dict[str, list[int]] | list[int], methods: list[str]) -> str:
    lines = []
    for task, per in summary.items():
        task_sizes = sizes[task] if isinstance(sizes, dict) else sizes
        ms = [m for m in methods if m in per]
        lines.append(f"\n{task}: test AUC (mean ± 95 % t-interval over seeds) / accuracy (mean)\n")
        lines.append("| labels | " + " | ".join(ms) + " |")
        lines.append("|---:|" + "---:|" * len(ms))
        for n in task_sizes:
            lines.append(f"| {n} | " + " | ".join(_cell(per[m]["by_size"].get(n)) for m in ms) + " |")
        lines.append("")
        targets = list(per[ms[0]]["labels_for"])
        lines.append("| labels needed for | " + " | ".join(ms) + " |")
        lines.append("|---|" + "---:|" * len(ms))
        for t in targets:
            cells = []
            for m in ms:
                need = per[m]["labels_for"][t]
                seeds = ", ".join("-" if v is None else str(v) for v in need["per_seed"].values())
                cells.append(f"{_needed(need['mean_curve'], task_sizes)} (seeds: {seeds})")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _needed(n: int | None, sizes: list[int]) -> str:
    if n is None:
        return f"> {max(sizes)}"
    return f"<= {n}" if n == sizes[0] else str(n)


# ---------------------------------------------------------------------------------------------- main

def _int_list(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--checkpoint", help="a trained GalaxAlign checkpoint (default: train the tiny one first)")
    ap.add_argument("--encoder", action="append", default=[], metavar="NAME=MODEL",
                    help="an encoder to fit heads on (repeatable): a checkpoint, or 'foundation' for the shipped "
                         "label-free foundation")
    ap.add_argument("--seeds", type=int, default=3, help="label draws (and head seeds) per size")
    ap.add_argument("--resnet-seeds", type=int, default=1, help="of those, how many also train a ResNet18")
    ap.add_argument("--sizes", default="10,20,50,100,200,500", help="numbers of labels")
    ap.add_argument("--binary-class", default=BINARY_CLASS, help="the positive class of the binary task")
    ap.add_argument("--unseen", default=None, metavar="KEY,KEY",
                    help="also a multi-class task among these classes (e.g. the ones an encoder withheld)")
    ap.add_argument("--unseen-sizes", default="3,6,15,30,60,150", help="numbers of labels of the unseen task")
    ap.add_argument("--no-galaxy10", action="store_true", help="skip the 10-class task's heads")
    ap.add_argument("--pool-per-class", type=int, default=70, help="labelled pool per class (draws come from it)")
    ap.add_argument("--test-per-class", type=int, default=30, help="test galaxies per class")
    ap.add_argument("--resnet-epochs", type=int, default=8, help="ResNet18 epochs over the labels (budget rule)")
    ap.add_argument("--resnet-min-steps", type=int, default=20, help="ResNet18 minimum steps (budget rule)")
    ap.add_argument("--resnet-size", type=int, default=None,
                    help="resample the cutouts to this side for the ResNet18 (default: as the encoder sees them)")
    ap.add_argument("--no-resnet", action="store_true", help="heads only")
    ap.add_argument("--fewshot-seed", type=int, default=FEWSHOT_SEED, help="simulator seed of the few-shot set")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--work", help="working directory (default: a temporary one); keeps ResNet18 results, which "
                                   "do not depend on the encoder, for later runs with the same settings")
    args = ap.parse_args(argv)

    import torch

    from galaxalign_batch import progress
    from galaxalign_batch.engine.encoder import load_encoder

    progress.disable()
    torch.set_num_threads(args.threads)
    sizes = _int_list(args.sizes)
    if sizes[0] < 10:
        raise SystemExit("sizes must be at least 10 (one label per class of the 10-class task)")
    t_start = time.perf_counter()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-fewshot-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    timing: dict = {}

    # encoders: NAME -> checkpoint
    named: dict[str, Path] = {}
    if args.checkpoint and args.encoder:
        raise SystemExit("give --checkpoint or --encoder, not both")
    for item in args.encoder:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise SystemExit(f"--encoder takes NAME=MODEL, got {item!r}")
        if name in named:
            raise SystemExit(f"two encoders named {name!r}")
        named[name] = expand_shipped_foundation(work) if model == "foundation" else Path(model)
    if args.checkpoint:
        named[""] = Path(args.checkpoint)
        timing["checkpoint"] = "given"
    if not named:
        print("training the tiny GalaxAlign (no --checkpoint) ...", flush=True)
        ckpt, timing["checkpoint"] = train_checkpoint(work)
        named[""] = ckpt
    for name, ckpt in named.items():
        seen_seed = training_seed(ckpt)
        if seen_seed == args.fewshot_seed:
            raise SystemExit(f"encoder {name or ckpt} was trained on simulator seed {seen_seed}: "
                             "choose another --fewshot-seed")

    sim = simulate_fewshot(work, args.pool_per_class, args.test_per_class, args.fewshot_seed)
    timing["fewshot_simulate_seconds"] = sim["simulate_seconds"]
    keys = sim["keys"]
    k = len(keys)
    if args.binary_class not in keys:
        raise SystemExit(f"unknown --binary-class {args.binary_class!r}; classes: {', '.join(keys)}")
    pos = keys.index(args.binary_class)
    unseen = [c.strip() for c in args.unseen.split(",") if c.strip()] if args.unseen else []
    if any(c not in keys for c in unseen) or len(set(unseen)) != len(unseen) or len(unseen) == 1:
        raise SystemExit(f"--unseen takes 2+ distinct class keys of: {', '.join(keys)}")
    binary_task = f"{args.binary_class}_vs_rest"
    task_classes = {binary_task: [args.binary_class]}
    if not args.no_galaxy10:
        task_classes["galaxy10"] = list(keys)
    unseen_task = f"unseen{len(unseen)}" if unseen else None
    if unseen_task:
        task_classes[unseen_task] = unseen
    task_sizes = {t: sizes for t in task_classes}
    if unseen_task:
        task_sizes[unseen_task] = _int_list(args.unseen_sizes)
        if task_sizes[unseen_task][0] < len(unseen):
            raise SystemExit(f"--unseen-sizes must be at least {len(unseen)} (one label per class)")

    # cutouts per distinct CutoutSpec, embeddings per encoder (rounded to float16 as the store keeps them)
    encoders, cuts, emb, facts = {}, {}, {}, {}
    t0 = time.perf_counter()
    for name, ckpt in named.items():
        enc = load_encoder(str(ckpt))
        spec_key = json.dumps(enc.spec.to_dict(), sort_keys=True)
        if spec_key not in cuts:
            cuts[spec_key] = cut_set(sim, enc.spec)
        (px_pool, lab_pool), (px_test, lab_test) = cuts[spec_key]["pool"], cuts[spec_key]["test"]
        emb[name] = (enc.encode(px_pool).astype(np.float16).astype(np.float32),
                     enc.encode(px_test).astype(np.float16).astype(np.float32))
        encoders[name] = enc
        facts[name or "galaxalign"] = encoder_facts(ckpt, keys, task_classes)
    timing["embed_seconds"] = round(time.perf_counter() - t0, 1)
    first = next(iter(named))
    spec = encoders[first].spec
    (px_pool, lab_pool), (px_test, lab_test) = cuts[json.dumps(spec.to_dict(), sort_keys=True)].values()

    def method(name: str, kind: str) -> str:
        return f"{name} {kind}" if name else kind

    methods = [method(name, kind) for name in named for kind in HEADS] + ([] if args.no_resnet else ["resnet18"])
    print(f"few-shot set: pool {len(lab_pool)}, test {len(lab_test)} ({args.test_per_class} per class), "
          f"cutouts {px_pool.shape[1:]}; encoders: "
          + "; ".join(f"{n or 'galaxalign'} {p} ({emb[n][0].shape[1]}-d)" for n, p in named.items()), flush=True)
    for n, f in facts.items():
        print(f"  {n}: stage {f['stage']}, withheld {f['withheld_classes'] or 'none'}, saw target labels "
              f"{f['saw_target_labels']}", flush=True)

    # tasks: name -> (pool indices usable, target of pool labels, test indices, target of test labels, classes)
    u_idx = [keys.index(c) for c in unseen]
    remap = np.full(k, -1, np.int64)
    remap[u_idx] = np.arange(len(u_idx))
    tasks = {binary_task: (lambda lab: (lab == pos).astype(np.int64), ["rest", args.binary_class])}
    if not args.no_galaxy10:
        tasks["galaxy10"] = (lambda lab: lab, list(keys))
    if unseen_task:
        tasks[unseen_task] = (lambda lab: remap[lab], unseen)
    test_sel = {t: np.arange(len(lab_test)) for t in tasks}
    if unseen_task:
        test_sel[unseen_task] = np.flatnonzero(remap[lab_test] >= 0)
        pool_u = np.flatnonzero(remap[lab_pool] >= 0)

    runs = []
    t_heads = t_resnet = 0.0
    cache_file = work / "resnet-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cached = 0

    def resnet(task_tag, seed, n, idx, labels_idx, test_idx, kk, positive):
        nonlocal t_resnet, cached
        key = json.dumps([args.fewshot_seed, args.pool_per_class, args.test_per_class, seed, n,
                          args.resnet_epochs, args.resnet_min_steps, spec.to_dict()]
                         + ([task_tag] if task_tag else []) + ([args.resnet_size] if args.resnet_size else []))
        if key in cache:
            cached += 1
            return cache[key]
        t = time.perf_counter()
        rn = run_resnet(px_pool[idx], labels_idx, px_test[test_idx], tasks_target_test[task_tag or "ten"], kk,
                        positive, seed, args.resnet_epochs, args.resnet_min_steps, args.resnet_size)
        t_resnet += time.perf_counter() - t
        cache[key] = rn
        cache_file.write_text(json.dumps(cache))
        return rn

    tasks_target_test = {"ten": lab_test}
    if unseen_task:
        tasks_target_test[unseen_task] = remap[lab_test[test_sel[unseen_task]]]

    for seed in range(args.seeds):
        with_resnet = "resnet18" in methods and seed < args.resnet_seeds
        picks = draws(lab_pool, sizes, seed, k)
        for n in sizes:
            idx = picks[n]
            rn = (resnet(None, seed, n, idx, lab_pool[idx], np.arange(len(lab_test)), k, pos)
                  if with_resnet else None)
            for task in (binary_task, "galaxy10"):
                if task not in tasks:
                    continue
                target, classes = tasks[task]
                y_tr, y_te = target(lab_pool[idx]), target(lab_test)
                for name in named:
                    for kind in HEADS:
                        t = time.perf_counter()
                        r = run_head(kind, emb[name][0][idx], y_tr, emb[name][1], y_te, classes, seed)
                        t_heads += time.perf_counter() - t
                        runs.append({"task": task, "method": method(name, kind), "size": n, "seed": seed, **r})
                if rn is not None:
                    r = rn["binary" if task == binary_task else "multi"]
                    runs.append({"task": task, "method": "resnet18", "size": n, "seed": seed, **r})
                _progress(runs, task, n, seed)
        if unseen_task:
            target, classes = tasks[unseen_task]
            ku = len(unseen)
            sub = draws(remap[lab_pool[pool_u]], task_sizes[unseen_task], seed, ku)
            te = test_sel[unseen_task]
            y_te = target(lab_test[te])
            for n in task_sizes[unseen_task]:
                idx = pool_u[sub[n]]
                y_tr = target(lab_pool[idx])
                for name in named:
                    for kind in HEADS:
                        t = time.perf_counter()
                        r = run_head(kind, emb[name][0][idx], y_tr, emb[name][1][te], y_te, classes, seed)
                        t_heads += time.perf_counter() - t
                        runs.append({"task": unseen_task, "method": method(name, kind), "size": n, "seed": seed,
                                     **r})
                if with_resnet:
                    rn = resnet(unseen_task, seed, n, idx, y_tr, te, ku, None)
                    runs.append({"task": unseen_task, "method": "resnet18", "size": n, "seed": seed,
                                 **rn["multi"]})
                _progress(runs, unseen_task, n, seed)
    timing["heads_seconds"] = round(t_heads, 1)
    timing["resnet_seconds"] = round(t_resnet, 1)
    if cached:
        timing["resnet_runs_from_cache"] = cached
    timing["total_seconds"] = round(time.perf_counter() - t_start, 1)
    summary = summarise(runs, list(tasks), methods, task_sizes,
                        multi={t for t in tasks if t != binary_task})
    text = table(summary, task_sizes, methods)
    print(text)
    print("\ntimes (s):", json.dumps(timing))
    if args.json:
        out = {"date": _now(), "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                                           "torch": torch.__version__, "threads": args.threads,
                                           "load_average_end": os.getloadavg()},
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "encoders": facts, "settings": {k2: v for k2, v in vars(args).items() if k2 not in ("json",)},
               "sizes": task_sizes, "tasks": list(tasks), "task_classes": task_classes, "methods": methods,
               "timing": timing, "summary": summary, "runs": runs, "table": text}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _progress(runs: list[dict], task: str, n: int, seed: int) -> None:
    done = [x for x in runs if x["task"] == task and x["size"] == n and x["seed"] == seed]
    print(f"seed {seed} n {n:>4} {task:>18}: " + "  ".join(
        f"{x['method']} auc {x['auc'] if x['auc'] is None else round(x['auc'], 3)}" for x in done), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
