"""The tri-modal claim, measured: tri-modal vs image-text vs image-only, from random weights and from the
pretrained foundation, at several label budgets and seeds, the same number of optimisation steps per run.

    python bench/galaxalign.py --data SIM --out /tmp/bench-ga [--modes trimodal image-text image-only]
        [--inits random foundation] [--budgets 10 30 100 all] [--seeds 0 1 2 3 4] [--steps 200]

SIM is a simulator labelled set (``galaxalign-batch simulate --out SIM --labelled``). Each run is one
``galaxalign-batch train`` (1 thread) followed by the held-out *test* split scored by the mode's primary
method (tri-modal: text + symbol prototypes; image-text: text prototypes; image-only: linear head).
Budget: ``--steps`` optimisation steps at batch 32 for every mode, split as align (from the foundation
only: a quarter of the steps, projections only) + the mode's stages (tri-modal: half stage 1, half
stage 2). A label budget of N keeps N training images per class (``--limit-per-class``); val and test
are unchanged. Results: ``OUT/results.json`` (one row per run) and ``OUT/table.md`` (mean and 95 %
t-interval over seeds). Runs already in results.json are skipped, so the bench resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def run_one(data: Path, out: Path, mode: str, init: str, budget: str, seed: int, steps: int, foundation: Path) -> dict:
    per_class = _train_count(data)
    n_train = sum(min(v, int(budget)) if budget != "all" else v for v in per_class.values())
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
    t = time.perf_counter()
    _cli(args)
    train_s = time.perf_counter() - t
    _cli(["evaluate", "--checkpoints", str(out / "model.safetensors"), "--names", "m", "--data", str(data),
          "--out", str(out / "eval")])
    row = json.loads((out / "eval" / "table.json").read_text())[0]
    return {"mode": mode, "init": init, "budget": budget, "seed": seed, "train_images": n_train,
            "steps_per_epoch": spe, "command": "galaxalign-batch " + " ".join(args),
            "accuracy": row["primary_accuracy"], "method": row["primary"], "acc_text": row["acc_text"],
            "acc_symbol": row["acc_symbol"], "acc_combined": row["acc_combined"], "p@10": row["precision@10"],
            "train_seconds": round(train_s, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| mode | init | labels/class | n | accuracy mean | 95 % interval | per seed |",
             "|---|---|---:|---:|---:|---|---|"]
    keys = sorted({(r["mode"], r["init"], r["budget"]) for r in rows},
                  key=lambda k: (k[0], k[1], 10 ** 9 if k[2] == "all" else int(k[2])))
    for mode, init, budget in keys:
        acc = np.array([r["accuracy"] for r in rows if (r["mode"], r["init"], r["budget"]) == (mode, init, budget)])
        m = acc.mean()
        if len(acc) > 1:
            h = T95.get(len(acc) - 1, 1.96) * acc.std(ddof=1) / math.sqrt(len(acc))
            ci = f"{m - h:.3f} - {m + h:.3f}"
        else:
            ci = "(one seed)"
        lines.append(f"| {mode} | {init} | {budget} | {len(acc)} | {m:.3f} | {ci} | "
                     f"{', '.join(f'{a:.3f}' for a in acc)} |")
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
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    foundation = Path(a.foundation)
    if "foundation" in a.inits:
        from galaxalign_batch.errors import ConfigError
        from galaxalign_batch.model.pretrain import expand_foundation

        expanded = out / "foundation" / "model.safetensors"
        if not expanded.is_file():
            try:
                expand_foundation(foundation, expanded)   # a compact foundation file
            except ConfigError:
                expanded = foundation                      # an ordinary checkpoint: used as it is
        foundation = expanded
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["mode"], r["init"], r["budget"], r["seed"]) for r in rows}
    for seed in a.seeds:
        for budget in a.budgets:
            for init in a.inits:
                for mode in a.modes:
                    if (mode, init, budget, seed) in done:
                        continue
                    r = run_one(Path(a.data), out / f"{mode}-{init}-{budget}-s{seed}", mode, init, budget, seed,
                                a.steps, foundation)
                    rows.append(r)
                    results_path.write_text(json.dumps(rows, indent=1))
                    print(f"{mode:10s} {init:10s} {budget:>4s} seed {seed}: acc {r['accuracy']:.3f} "
                          f"({r['train_seconds']:.0f} s)", flush=True)
    md = f"Machine: {cpu_model()}, 1 torch thread; {a.steps} steps per run, batch {BATCH}.\n\n" + table(rows)
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
