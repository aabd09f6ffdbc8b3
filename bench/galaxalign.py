"""The tri-modal claim, measured: tri-modal vs image-text vs image-only, from random weights and from the
pretrained foundation, at several label budgets and seeds, the same number of optimisation steps per run.

    python bench/galaxalign.py --data SIM --out /tmp/bench-ga [--modes trimodal image-text image-only]
        [--inits random foundation] [--budgets 10 30 100 all] [--seeds 0 1 2 3 4] [--steps 200]
        [--variant NAME --train-args "--schedule run ..."] [--withhold KEY,KEY]

SIM is a simulator labelled set (``galaxalign-batch simulate --out SIM --labelled``). Each run is one
``galaxalign-batch train`` (1 thread); the checkpoint is then scored in this process on the held-out *test*
split: every classification method that applies (tri-modal and image-text: text, symbol and combined
prototypes; image-only: linear head), the mode's primary method (tri-modal: combined; image-text: text;
image-only: head), same-class precision@10 of the image embeddings, and a **linear probe** of the image
embeddings (logistic regression fitted on the embeddings of the *whole* train split, all labels, scored on
test): it separates "the representation is worse" from "the prototype scoring is worse".
Budget: ``--steps`` optimisation steps at batch 32 for every mode, split as align (from the foundation
only: a quarter of the steps, projections only) + the mode's stages (tri-modal: half stage 1, half
stage 2). A label budget of N keeps N training images per class (``--limit-per-class``); val and test
are unchanged.

Ablations: ``--variant NAME --train-args "..."`` appends the options to every ``train`` of the bench and
records the rows under that variant (``base`` without). ``--withhold KEY,KEY`` drops the *images* of those
classes from training (``train --withhold-classes``; tri-modal keeps their symbols and text) and scores the
test images of those classes through each prototype, both among all classes (``10-way``) and among the
withheld classes only (``2-way``).

Results: ``OUT/results.json`` (one row per run) and ``OUT/table.md`` (mean and 95 % t-interval over seeds).
Runs already in results.json are skipped, so the bench resumes; rows without a probe (older rows) are
re-scored from their checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOUNDATION = ROOT / "galaxalign_batch" / "data" / "foundation-tiny.safetensors"
BATCH = 32
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _cli(args: list[str]) -> None:
    env = dict(os.environ, GALAXALIGN_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "galaxalign_batch", "--log-level", "WARNING", "--no-progress"] + args,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: galaxalign-batch {' '.join(args)}\n{proc.stderr[-3000:]}")


def _train_count(data: Path) -> dict[int, int]:
    root = data / "labelled" if (data / "labelled").is_dir() else data
    with np.load(root / "train.npz") as z:
        labels = z["label"]
    return {int(c): int((labels == c).sum()) for c in np.unique(labels)}


def run_one(data: Path, out: Path, mode: str, init: str, budget: str, seed: int, steps: int, foundation: Path,
            extra: list[str]) -> dict:
    per_class = _train_count(data)
    withheld = _withheld(extra)
    n_train = sum(min(v, int(budget)) if budget != "all" else v for c, v in per_class.items() if c not in withheld)
    spe = max(1, n_train // BATCH)
    align_steps = steps // 4 if init == "foundation" else 0
    main_epochs = max(1, math.ceil((steps - align_steps) / spe))
    args = ["train", "--data", str(data), "--out", str(out), "--mode", mode, "--batch-size", str(BATCH),
            "--seed", str(seed), "--threads", "1", "--no-resume"]
    if budget != "all":
        args += ["--limit-per-class", budget]
    if init == "foundation":
        args += ["--model", str(foundation), "--lr", "3e-4", "--align-epochs", str(max(1, math.ceil(align_steps / spe))),
                 "--align-lr", "1e-2"]
    else:
        args += ["--lr", "1e-3"]
    if mode == "trimodal":
        s1 = max(1, main_epochs // 2)
        args += ["--epochs-stage1", str(s1), "--epochs-stage2", str(max(1, main_epochs - s1))]
    else:
        args += ["--epochs", str(main_epochs)]
    args += _stage_override(extra, main_epochs) if mode == "trimodal" else [a for a in extra if a != "--stage1-only"]
    t = time.perf_counter()
    _cli(args)
    train_s = time.perf_counter() - t
    row = {"mode": mode, "init": init, "budget": budget, "seed": seed, "train_images": n_train,
           "steps_per_epoch": spe, "command": "galaxalign-batch " + " ".join(args), "train_seconds": round(train_s, 1)}
    row.update(score(out / "model.safetensors", data))
    return row


def _stage_override(extra: list[str], main_epochs: int) -> list[str]:
    """``--stage1-only`` (a bench flag, not train's): all of tri-modal's main epochs in stage 1, no stage 2
    (the later ``--epochs-stage1/2`` win over the ones set above)."""
    if "--stage1-only" not in extra:
        return list(extra)
    return [a for a in extra if a != "--stage1-only"] + ["--epochs-stage1", str(main_epochs), "--epochs-stage2", "0"]


def _withheld(extra: list[str]) -> set[int]:
    if "--withhold-classes" not in extra:
        return set()
    from galaxalign_batch.vocabulary import load_vocabulary

    keys = load_vocabulary("galaxy10").keys
    return {keys.index(k) for k in extra[extra.index("--withhold-classes") + 1].split(",")}


_DATA: dict = {}


def _splits(data: Path, model):
    """(train, test) ImageSets of the labelled set, cut with the model's CutoutSpec (cached)."""
    from galaxalign_batch.model.data import load_dataset
    from galaxalign_batch.preprocess import CutoutSpec

    spec = CutoutSpec.from_dict(model.info["cutout_spec"])
    key = (str(data), json.dumps(spec.to_dict(), sort_keys=True), model.vocabulary.digest())
    if key not in _DATA:
        ds = load_dataset(data, model.vocabulary, spec=spec)
        _DATA[key] = (ds.split("train"), ds.split("test"))
    return _DATA[key]


def score(checkpoint: Path, data: Path) -> dict:
    """Test-split metrics of one checkpoint (see the module docstring)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from galaxalign_batch.model import load_checkpoint
    from galaxalign_batch.model.evaluate import evaluate_model

    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint, device="cpu")
    train, test = _splits(data, model)
    r = evaluate_model(model, test.images, test.labels, ks=(10,))
    cls = r["classification"]
    row = {"accuracy": cls[r["primary"]]["accuracy"], "method": r["primary"],
           **{f"acc_{m}": cls[m]["accuracy"] if m in cls else None for m in ("text", "symbol", "combined", "head")},
           "p@10": r["retrieval"]["precision@10"]}
    f_train = model.encode_images(train.images).numpy()
    f_test = model.encode_images(test.images).numpy()
    scaler = StandardScaler().fit(f_train)
    probe = LogisticRegression(max_iter=3000).fit(scaler.transform(f_train), train.labels)
    row["probe"] = float((probe.predict(scaler.transform(f_test)) == test.labels).mean())
    withheld = model.info.get("withheld_classes")
    if withheld and model.mode != "image-only":
        ids = [model.vocabulary.keys.index(k) for k in withheld]
        sel = np.isin(test.labels, ids)
        feats = torch.from_numpy(f_test[sel])
        truth = test.labels[sel]
        text, symbol = model.class_prototypes("text"), model.class_prototypes("symbol")
        protos = {"text": text, "symbol": symbol, "combined": torch.nn.functional.normalize(text + symbol, dim=-1)}
        for m, pr in protos.items():
            sims = (feats @ pr.T).numpy()
            row[f"unseen_{m}_10way"] = float((sims.argmax(1) == truth).mean())
            row[f"unseen_{m}_2way"] = float((np.asarray(ids)[sims[:, ids].argmax(1)] == truth).mean())
        row["withheld"] = list(withheld)
    return row


def _ci(values: list[float]) -> tuple[float, str]:
    acc = np.asarray(values, float)
    m = float(acc.mean())
    if len(acc) < 2:
        return m, "(one seed)"
    h = T95.get(len(acc) - 1, 1.96) * acc.std(ddof=1) / math.sqrt(len(acc))
    return m, f"{m - h:.3f} - {m + h:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| variant | mode | init | labels/class | n | accuracy mean | 95 % interval | text-prototype acc | "
             "linear probe mean | probe 95 % | P@10 | per seed |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|---:|---|"]
    keys = sorted({(r.get("variant", "base"), r["mode"], r["init"], r["budget"]) for r in rows},
                  key=lambda k: (k[0] != "base", k[0], k[1], k[2], 10 ** 9 if k[3] == "all" else int(k[3])))
    for variant, mode, init, budget in keys:
        sel = [r for r in rows if (r.get("variant", "base"), r["mode"], r["init"], r["budget"]) == (variant, mode, init, budget)]
        m, ci = _ci([r["accuracy"] for r in sel])
        text = [r["acc_text"] for r in sel if r.get("acc_text") is not None]
        probes = [r["probe"] for r in sel if r.get("probe") is not None]
        pm, pci = _ci(probes) if probes else (float("nan"), "-")
        per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in sel)
        lines.append(f"| {variant} | {mode} | {init} | {budget} | {len(sel)} | {m:.3f} | {ci} | "
                     f"{np.mean(text) if text else float('nan'):.3f} | {pm:.3f} | {pci} | "
                     f"{np.mean([r['p@10'] for r in sel]):.3f} | {per_seed} |")
    unseen = [r for r in rows if r.get("withheld")]
    if unseen:
        lines += ["", "Unseen classes (" + ", ".join(unseen[0]["withheld"]) + "): accuracy on their test images",
                  "", "| variant | mode | init | n | prototype | 10-way mean | 95 % | 2-way mean | 95 % |",
                  "|---|---|---|---:|---|---:|---|---:|---|"]
        for variant, mode, init in sorted({(r.get("variant", "base"), r["mode"], r["init"]) for r in unseen}):
            sel = [r for r in unseen if (r.get("variant", "base"), r["mode"], r["init"]) == (variant, mode, init)]
            for m in ("text", "symbol", "combined"):
                a10, c10 = _ci([r[f"unseen_{m}_10way"] for r in sel])
                a2, c2 = _ci([r[f"unseen_{m}_2way"] for r in sel])
                lines.append(f"| {variant} | {mode} | {init} | {len(sel)} | {m} | {a10:.3f} | {c10} | {a2:.3f} | {c2} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--modes", nargs="+", default=["trimodal", "image-text", "image-only"])
    p.add_argument("--inits", nargs="+", default=["random", "foundation"], choices=["random", "foundation"])
    p.add_argument("--budgets", nargs="+", default=["10", "30", "100", "all"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=200, help="optimisation steps per run (every mode alike)")
    p.add_argument("--foundation", default=str(FOUNDATION), help="compact foundation file or a checkpoint")
    p.add_argument("--variant", default=None, help="name of an ablation: rows and run folders carry it (default: base, "
                                                   "or 'withhold' with --withhold)")
    p.add_argument("--train-args", default="", help="options appended to every train command (one string); "
                                                    "--stage1-only puts all of tri-modal's main epochs in stage 1")
    p.add_argument("--withhold", default=None, metavar="KEY,KEY",
                   help="withhold the images of these classes and score zero-shot accuracy on them")
    a = p.parse_args()
    extra = shlex.split(a.train_args)
    if a.withhold:
        extra += ["--withhold-classes", a.withhold]
    variant = a.variant or ("withhold" if a.withhold else "base")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    foundation = Path(a.foundation)
    if "foundation" in a.inits:
        from galaxalign_batch.errors import ConfigError
        from galaxalign_batch.model.pretrain import expand_foundation

        expanded = out / "foundation" / "model.safetensors"
        digest = hashlib.sha256(foundation.read_bytes()).hexdigest()
        source = out / "foundation" / "source.sha256"
        recorded = source.read_text().split()[0] if source.is_file() else digest
        if recorded != digest:
            # the results in OUT were trained from another file (e.g. the shipped foundation was re-made)
            sys.exit(f"{out} holds runs from another foundation (sha256 {recorded[:12]}, {foundation} is "
                     f"{digest[:12]}): give another --out")
        if not expanded.is_file():
            try:
                expand_foundation(foundation, expanded)   # a compact foundation file
            except ConfigError:
                expanded = foundation                      # an ordinary checkpoint: used as it is
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"{digest}  {foundation}\n")
        foundation = expanded
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    for r in rows:  # rows of an older bench: re-scored from their checkpoints (probe, every method)
        if "probe" not in r:
            folder = out / (f"{r['mode']}-{r['init']}-{r['budget']}-s{r['seed']}")
            r.update(score(folder / "model.safetensors", Path(a.data)))
            r.setdefault("variant", "base")
            r.setdefault("steps", a.steps)
            results_path.write_text(json.dumps(rows, indent=1))
    done = {(r.get("variant", "base"), r.get("steps"), r["mode"], r["init"], r["budget"], r["seed"]) for r in rows}
    tag = "" if variant == "base" else f"-{variant}"
    most = max(_train_count(Path(a.data)).values())
    budgets = [b for b in a.budgets if b == "all" or int(b) < most]
    if budgets != a.budgets:  # N >= the train images of every class is the same run as "all"
        print(f"budgets {', '.join(b for b in a.budgets if b not in budgets)} >= {most} images per class: "
              f"the same as 'all'", flush=True)
        budgets += [] if "all" in budgets else ["all"]
    for seed in a.seeds:
        for budget in budgets:
            for init in a.inits:
                for mode in a.modes:
                    if (variant, a.steps, mode, init, budget, seed) in done:
                        continue
                    r = run_one(Path(a.data), out / f"{mode}-{init}-{budget}-s{seed}{tag}", mode, init, budget, seed,
                                a.steps, foundation, extra)
                    r.update(variant=variant, steps=a.steps, train_args=a.train_args)
                    rows.append(r)
                    results_path.write_text(json.dumps(rows, indent=1))
                    print(f"{variant} {mode:10s} {init:10s} {budget:>4s} seed {seed}: acc {r['accuracy']:.3f} "
                          f"text {r['acc_text'] if r['acc_text'] is not None else float('nan'):.3f} "
                          f"probe {r['probe']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
    md = f"Machine: {cpu_model()}, 1 torch thread; {a.steps} steps per run, batch {BATCH}.\n\n" + table(rows)
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
