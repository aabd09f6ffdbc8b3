"""Few-shot learning curves: a head on frozen GalaxAlign embeddings vs a ResNet18 trained from scratch.

    python bench/fewshot.py [--json PATH] [--checkpoint CKPT] [--seeds 3] [--sizes 10,20,50,100,200,500]

Data: a fresh simulated labelled set (``simulate_labelled``, seed ``--fewshot-seed``, not the seed the
checkpoint was trained on: refused when they are equal) of ``--pool-per-class`` + ``--test-per-class``
galaxies per Galaxy10 class. Both methods see the same 64-px cutouts (the checkpoint's CutoutSpec,
cut at the stamp centres as ``train`` and ``embed`` cut them), the same labelled draws and the same
test set. A draw of ``n`` labels is stratified over the 10 classes (``n/10`` each, nested: the draw of
200 contains the draw of 100 for a seed), as an expert labelling a balanced sample would.

Tasks: ``merging`` vs rest (binary, 10 % positives: 1 positive at 10 labels) on the same draws, and
the 10-class Galaxy10 task. AUC: of the positive class (binary), macro one-vs-rest (10 classes).

Methods:
- ``linear`` / ``mlp``: :func:`galaxalign_batch.fewshot.fit_head` on the checkpoint's embeddings
  (rounded to float16 as the store keeps them);
- ``resnet18``: torchvision ``resnet18(weights=None)``, trained once per draw on its 10-class labels and
  scored on both tasks (binary: by its probability of ``merging``), which gives the baseline more
  label information than the binary head gets and halves its cost; AdamW (lr 1e-3, weight decay 1e-4, cosine
  decay), batch ``min(32, n)``, random 90-degree rotations and flips, trained for a fixed rule at
  every size: ``max(--resnet-min-steps, --resnet-epochs x ceil(n / batch))`` steps. The default
  budget (8 epochs, at least 20 steps) is what fits a ~20-minute run on 2 shared CPU cores; it
  is far from a converged from-scratch training at 200-500 labels, so the JSON keeps each run's
  final training accuracy; raise ``--resnet-epochs`` for a longer budget.

ResNet18 results do not depend on the checkpoint: with ``--work DIR`` they are kept in
``DIR/resnet-cache.json`` (keyed by the few-shot set, draw, size and budget) and reused by a later
run comparing another checkpoint; the JSON says how many came from there.

Without ``--checkpoint`` the tiny GalaxAlign is trained first exactly as ``galaxalign-batch train``
does with the settings of the project's shared run (simulated labelled set seed 0, 120 per class;
trimodal, 6 + 6 epochs, batch 32, lr 1e-3, one thread): ~12 minutes on a quiet 2-core machine, 42
measured on a heavily shared one (bench/RESULTS.md).
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

FEWSHOT_SEED = 20261123
BINARY_CLASS = "merging"
AUC_TARGET = 0.9
HEADS = ("linear", "mlp")


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


def fewshot_set(work: Path, spec, pool: int, test: int, seed: int) -> dict:
    """The fresh labelled set, cut to the checkpoint's cutouts: pool (labels are drawn from it) and test."""
    from galaxalign_batch.model.data import cut_stamps
    from galaxalign_batch.simulate import simulate_labelled

    t0 = time.perf_counter()
    n = pool + test
    manifest = simulate_labelled(work / "fewshot-sim", n_per_class=n, seed=seed, splits=(pool / n, 0.0, test / n),
                                 workers=2)
    out = {"keys": manifest["vocabulary"]["keys"], "simulate_seconds": round(time.perf_counter() - t0, 1)}
    for split, name in (("train", "pool"), ("test", "test")):
        with np.load(manifest["files"][split]) as z:
            pixels, _ = cut_stamps(z["flux"], manifest["pixscale"], spec, tuple(manifest["bands"]))
            out[name] = (pixels, z["label"].astype(np.int64))
    return out


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
                 batch: int = 32):
    """ResNet18 from scratch under the fixed budget rule (module docstring); returns (model, norm, info)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = _to_float(pixels)
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
    return model, (mean, std), {"steps": steps, "batch": bs, "final_train_loss": float(loss.detach()),
                                "last_epoch_train_accuracy": correct / max(seen, 1)}


def _to_float(pixels: np.ndarray):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels))
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


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
    mean, std = norm
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = ((_to_float(pixels[i:i + batch]) - mean) / std).contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(model(x), 1).numpy())
    return np.concatenate(out)


def run_resnet(pixels_train, labels_train, pixels_test, labels_test, k: int, positive: int, seed: int,
               epochs: int, min_steps: int) -> dict[str, dict]:
    """One ResNet18 trained on the 10-class labels; scored on the 10-class task and, by P(positive), the binary one."""
    from galaxalign_batch.fewshot.heads import auc_score

    t0 = time.perf_counter()
    model, norm, info = train_resnet(pixels_train, labels_train, k, seed, epochs, min_steps)
    train_s = time.perf_counter() - t0
    p = resnet_probs(model, norm, pixels_test)
    is_pos = (labels_test == positive).astype(np.int64)
    p_pos = p[:, positive].astype(np.float64)
    common = {"fit_seconds": round(train_s, 1), "trained_on": "10-class labels", **info}
    return {"multi": {"auc": auc_score(p, labels_test), "accuracy": float(np.mean(p.argmax(1) == labels_test)), **common},
            "binary": {"auc": auc_score(np.stack([1 - p_pos, p_pos], 1), is_pos),
                       "accuracy": float(np.mean((p.argmax(1) == positive) == is_pos)), **common}}


# ---------------------------------------------------------------------------------------------- summary

def summarise(runs: list[dict], tasks: list[str], methods: list[str], sizes: list[int]) -> dict:
    out: dict = {}
    for task in tasks:
        out[task] = {}
        for m in methods:
            rows = {}
            for n in sizes:
                r = [x for x in runs if x["task"] == task and x["method"] == m and x["size"] == n]
                if not r:
                    continue
                auc = [x["auc"] for x in r if x["auc"] is not None]
                acc = [x["accuracy"] for x in r]
                rows[n] = {"auc_mean": float(np.mean(auc)) if auc else None,
                           "auc_std": float(np.std(auc)) if auc else None,
                           "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc)), "seeds": len(r)}
            reached = [n for n in sizes if n in rows and (rows[n]["auc_mean"] or 0) >= AUC_TARGET]
            out[task][m] = {"by_size": rows, "labels_for_auc_0.9": reached[0] if reached else None}
    return out


def table(summary: dict, sizes: list[int], methods: list[str]) -> str:
    lines = []
    for task, per in summary.items():
        lines.append(f"\n{task}: test AUC / accuracy (mean over seeds; +- std of AUC)")
        lines.append(f"{'labels':>7} " + " ".join(f"{m:>22}" for m in methods))
        for n in sizes:
            cells = []
            for m in methods:
                r = per[m]["by_size"].get(n)
                cells.append(f"{'-':>22}" if r is None or r["auc_mean"] is None else
                             f"{r['auc_mean']:.3f}+-{r['auc_std']:.3f} / {r['accuracy_mean']:.3f}".rjust(22))
            lines.append(f"{n:>7} " + " ".join(cells))
        need = {m: per[m]["labels_for_auc_0.9"] for m in methods}
        lines.append("labels for AUC >= 0.9: " + ", ".join(f"{m} {_needed(need[m], sizes)}" for m in methods))
        head, base = need.get("linear"), need.get("resnet18")
        at_least = "at least " if head == sizes[0] else ""  # the head may need fewer than the smallest size
        if head and base:
            lines.append(f"  ResNet18 / linear head labels: {at_least}{base / head:.0f}x")
        elif head and "resnet18" in need:
            lines.append(f"  ResNet18 / linear head labels: more than {max(sizes) / head:.0f}x "
                         f"(ResNet18 not at AUC 0.9 with {max(sizes)} labels under this budget)")
    return "\n".join(lines)


def _needed(n: int | None, sizes: list[int]) -> str:
    if n is None:
        return f"not reached (<= {max(sizes)})"
    return f"<= {n}" if n == sizes[0] else str(n)


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--checkpoint", help="a trained GalaxAlign checkpoint (default: train the tiny one first)")
    ap.add_argument("--seeds", type=int, default=3, help="label draws (and head seeds) per size")
    ap.add_argument("--resnet-seeds", type=int, default=1, help="of those, how many also train a ResNet18")
    ap.add_argument("--sizes", default="10,20,50,100,200,500", help="numbers of labels")
    ap.add_argument("--pool-per-class", type=int, default=70, help="labelled pool per class (draws come from it)")
    ap.add_argument("--test-per-class", type=int, default=30, help="test galaxies per class")
    ap.add_argument("--resnet-epochs", type=int, default=8, help="ResNet18 epochs over the labels (budget rule)")
    ap.add_argument("--resnet-min-steps", type=int, default=20, help="ResNet18 minimum steps (budget rule)")
    ap.add_argument("--no-resnet", action="store_true", help="heads only")
    ap.add_argument("--fewshot-seed", type=int, default=FEWSHOT_SEED, help="simulator seed of the few-shot set")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--work", help="working directory (default: a temporary one); keeps ResNet18 results, which "
                                   "do not depend on the checkpoint, for later runs with the same settings")
    args = ap.parse_args(argv)

    import torch

    from galaxalign_batch import progress
    from galaxalign_batch.engine.encoder import load_encoder

    progress.disable()
    torch.set_num_threads(args.threads)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if sizes[0] < 10:
        raise SystemExit("sizes must be at least 10 (one label per class of the 10-class task)")
    t_start = time.perf_counter()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-fewshot-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    timing: dict = {}
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        timing["checkpoint"] = "given"
    else:
        print("training the tiny GalaxAlign (no --checkpoint) ...", flush=True)
        ckpt, timing["checkpoint"] = train_checkpoint(work)
    seen_seed = training_seed(ckpt)
    if seen_seed == args.fewshot_seed:
        raise SystemExit(f"the checkpoint was trained on simulator seed {seen_seed}: choose another --fewshot-seed")

    enc = load_encoder(str(ckpt))
    data = fewshot_set(work, enc.spec, args.pool_per_class, args.test_per_class, args.fewshot_seed)
    timing["fewshot_simulate_seconds"] = data["simulate_seconds"]
    keys = data["keys"]
    k = len(keys)
    (px_pool, lab_pool), (px_test, lab_test) = data["pool"], data["test"]
    t0 = time.perf_counter()
    emb_pool = enc.encode(px_pool).astype(np.float16).astype(np.float32)  # the store's precision
    emb_test = enc.encode(px_test).astype(np.float16).astype(np.float32)
    timing["embed_seconds"] = round(time.perf_counter() - t0, 1)
    pos = keys.index(BINARY_CLASS)
    binary_task = f"{BINARY_CLASS}_vs_rest"
    tasks = {binary_task: (lambda lab: (lab == pos).astype(np.int64), ["rest", BINARY_CLASS]),
             "galaxy10": (lambda lab: lab, list(keys))}
    methods = list(HEADS) + ([] if args.no_resnet else ["resnet18"])
    print(f"few-shot set: pool {len(lab_pool)}, test {len(lab_test)} ({args.test_per_class} per class), "
          f"cutouts {px_pool.shape[1:]}, embeddings {emb_pool.shape[1]}-d; checkpoint {ckpt}", flush=True)

    runs = []
    t_heads = t_resnet = 0.0
    # ResNet18 results do not depend on the checkpoint: kept in --work, keyed by data, draw and budget
    cache_file = work / "resnet-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cached = 0
    for seed in range(args.seeds):
        picks = draws(lab_pool, sizes, seed, k)
        for n in sizes:
            idx = picks[n]
            for task, (target, classes) in tasks.items():
                y_tr, y_te = target(lab_pool[idx]), target(lab_test)
                for kind in HEADS:
                    t = time.perf_counter()
                    r = run_head(kind, emb_pool[idx], y_tr, emb_test, y_te, classes, seed)
                    t_heads += time.perf_counter() - t
                    runs.append({"task": task, "method": kind, "size": n, "seed": seed, **r})
                if "resnet18" in methods and seed < args.resnet_seeds:
                    if task == binary_task:  # one ResNet per draw, trained on the 10-class labels (see docstring)
                        key = json.dumps([args.fewshot_seed, args.pool_per_class, args.test_per_class, seed, n,
                                          args.resnet_epochs, args.resnet_min_steps, enc.spec.to_dict()])
                        rn = cache.get(key)
                        if rn is None:
                            t = time.perf_counter()
                            rn = run_resnet(px_pool[idx], lab_pool[idx], px_test, lab_test, k, pos, seed,
                                            args.resnet_epochs, args.resnet_min_steps)
                            t_resnet += time.perf_counter() - t
                            cache[key] = rn
                            cache_file.write_text(json.dumps(cache))
                        else:
                            cached += 1
                    r = rn["binary" if task == binary_task else "multi"]
                    runs.append({"task": task, "method": "resnet18", "size": n, "seed": seed, **r})
                done = [x for x in runs if x["task"] == task and x["size"] == n and x["seed"] == seed]
                print(f"seed {seed} n {n:>4} {task:>18}: " + "  ".join(
                    f"{x['method']} auc {x['auc'] if x['auc'] is None else round(x['auc'], 3)}" for x in done),
                    flush=True)
    timing["heads_seconds"] = round(t_heads, 1)
    timing["resnet_seconds"] = round(t_resnet, 1)
    if cached:
        timing["resnet_runs_from_cache"] = cached
        timing["resnet_cached_fit_seconds"] = round(sum(
            x["fit_seconds"] for x in runs if x["method"] == "resnet18" and x["task"] == binary_task), 1)
    timing["total_seconds"] = round(time.perf_counter() - t_start, 1)
    summary = summarise(runs, list(tasks), methods, sizes)
    text = table(summary, sizes, methods)
    print(text)
    print("\ntimes (s):", json.dumps(timing))
    if args.json:
        out = {"date": _now(), "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                                           "torch": torch.__version__, "threads": args.threads},
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "checkpoint": str(ckpt), "checkpoint_training_seed": seen_seed,
               "settings": {k2: v for k2, v in vars(args).items() if k2 not in ("json",)},
               "sizes": sizes, "tasks": list(tasks), "methods": methods, "timing": timing,
               "summary": summary, "runs": runs, "table": text}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
