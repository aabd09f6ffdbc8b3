"""`galaxalign-batch demo`: the whole path on the embedded default (a simulated survey).

simulate (survey + labelled set) -> foundation (the shipped compact foundation, expanded) -> train
(tiny model, tri-modal, fine-tuned from the foundation) -> evaluate -> embed -> classify -> search
-> join -> report -> summary. Each step is the same subcommand a user runs; the demo prints each
command so it can be re-run by hand, and ends with where the outputs are and ``summary.json``: test
accuracy, accuracy on the survey sources with known truth, mean pairwise cosine of the store's
embeddings, and how often a source's nearest neighbours share its true class.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from pathlib import Path

import numpy as np

from galaxalign_batch import atomic
from galaxalign_batch.cli import _options as opt

log = logging.getLogger("galaxalign_batch")

# (bricks, brick size px, labelled images per class, align epochs, epochs per stage, max steps per epoch)
SETTINGS = {
    "default": dict(bricks=4, size=1024, n_per_class=120, align=4, epochs=9, max_steps=None),
    "small": dict(bricks=2, size=512, n_per_class=40, align=2, epochs=2, max_steps=None),
    "smallest": dict(bricks=1, size=256, n_per_class=8, align=1, epochs=1, max_steps=2),
}
# The fine-tuning recipe from the foundation (docs/model.md, "The demo's recipe"): an align stage (only
# the projections train, lr 1e-2) and then both tri-modal stages at lr 3e-4, batch 32. One torch thread:
# on a shared 2-core machine it is several times faster than two (OpenMP spinning).
RECIPE = ["--batch-size", "32", "--lr", "3e-4", "--align-lr", "1e-2", "--threads", "1"]
FOUNDATION = Path(__file__).resolve().parent.parent / "data" / "foundation-tiny.safetensors"
NEIGHBOURS = 8


def _step(title: str, argv: list[str], timings: list[tuple[str, float]]) -> None:
    from galaxalign_batch.cli import main

    print(f"\n== {title}\n$ galaxalign-batch {shlex.join(argv)}", flush=True)
    t = time.perf_counter()
    code = main(["--log-level", logging.getLevelName(logging.getLogger().level)] + argv)
    timings.append((title, time.perf_counter() - t))
    # embed exits 3 when a tile failed; the simulated survey has none, so every step must succeed.
    if code != 0:
        from galaxalign_batch.errors import GalaxAlignError

        raise GalaxAlignError(f"demo step '{title}' failed (exit code {code}); see the messages above")


def run(args: argparse.Namespace) -> int:
    s = SETTINGS[args.size]
    out = Path(args.out)
    sky, model_dir, store = out / "sky", out / "model", out / "sky-embeddings.zarr"
    model = model_dir / "model.safetensors"
    timings: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    manifest = sky / "labelled" / "manifest.json"
    if manifest.exists():
        from galaxalign_batch.errors import GalaxAlignError
        from galaxalign_batch.simulate import GENERATOR_VERSION

        made_by = json.loads(manifest.read_text()).get("generator_version")
        if made_by != GENERATOR_VERSION:
            # a sky (and a model trained on it) from another generator would be reused silently
            raise GalaxAlignError(f"{out} holds a sky of simulator generator version {made_by}, this one draws "
                                  f"version {GENERATOR_VERSION}; remove {out} or use another --out")
    if not manifest.exists():
        _step("simulate a Legacy-Survey-like sky and a labelled set",
              ["simulate", "--out", str(sky), "--bricks", str(s["bricks"]), "--size", str(s["size"]),
               "--seed", str(args.seed), "--labelled", "--n-per-class", str(s["n_per_class"]),
               "--neighbours", "survey"], timings)
    else:
        print(f"\n== simulated sky already in {sky}")
    start = "galaxalign-tiny"
    if not model.exists() and not args.from_scratch:
        if not FOUNDATION.is_file():
            from galaxalign_batch.errors import GalaxAlignError

            raise GalaxAlignError(f"the shipped foundation {FOUNDATION} is missing; re-create it with the command in "
                                  f"docs/model.md or run the demo with --from-scratch")
        _step("expand the shipped foundation (pretrained without labels on an unlabelled simulated sky)",
              ["pretrain", "--expand", str(FOUNDATION), "--out", str(out / "foundation")], timings)
        start = str(out / "foundation" / "model.safetensors")
    if not model.exists():
        train = ["train", "--data", str(sky), "--out", str(model_dir), "--model", start,
                 "--mode", "trimodal", "--epochs-stage1", str(s["epochs"]), "--epochs-stage2", str(s["epochs"]),
                 "--seed", str(args.seed)] + RECIPE
        train += ["--lr", "1e-3"] if args.from_scratch else ["--align-epochs", str(s["align"])]
        if s["max_steps"]:
            train += ["--max-steps-per-epoch", str(s["max_steps"])]
        _step("fine-tune the tiny GalaxAlign model (stage 1: image/symbol-text; stage 2: + symbol encoder)",
              train, timings)
    else:
        print(f"\n== model already trained: {model}")
    _step("evaluate on the held-out split", ["evaluate", "--checkpoints", str(model), "--data", str(sky),
                                              "--out", str(out / "evaluation")], timings)
    _step("embed every source of the survey into a Zarr store (Ray)",
          ["embed", "--tiles", str(sky), "--model", str(model), "--out", str(store)], timings)
    _step("classify every source (zero-shot: text + symbol prototypes)",
          ["classify", "--store", str(store), "--model", str(model)], timings)
    first, first_row = _first_galaxy(store)
    _step("find galaxies like the first one", ["search", "--store", str(store), "--object", first, "-k", "8",
                                               "--plot", str(out / "search.png"), "--survey", str(sky)], timings)
    catalog = _truth_catalog(sky, out / "truth-catalog.fits")
    _step("cross-match a catalog (the simulated truth) with the store",
          ["join", "--store", str(store), "--catalog", str(catalog), "--radius", "1arcsec",
           "--out", str(out / "joined.parquet")], timings)
    _step("write the report", ["report", "--store", str(store), "--out", str(out / "report.html"),
                               "--survey", str(sky)], timings)

    summary = demo_summary(out, model, store, time.perf_counter() - t0, timings, args.size, first_row)
    atomic.write_json(out / "summary.json", summary)
    print("\n== summary (summary.json)")
    for k in ("test_accuracy", "survey_accuracy", "mean_pairwise_cosine", "neighbour_same_class",
              "first_query_neighbours_same_class"):
        print(f"  {k:34s} {summary[k]}")
    print(f"\n== done in {time.perf_counter() - t0:.0f} s")
    for title, sec in timings:
        print(f"  {sec:7.1f} s  {title}")
    print(f"""
outputs in {out}/:
  sky/                     simulated survey (coadd/, tractor/, survey-bricks.fits) and labelled/ set
  foundation/              the pretrained foundation the model was fine-tuned from
  model/model.safetensors  the trained checkpoint (metrics.csv beside it)
  evaluation/              accuracy table (Markdown, JSON) and confusion matrices
  sky-embeddings.zarr      the embedding store, with probs/label/confidence
  search.png               the first galaxy and its nearest neighbours
  joined.parquet           the truth catalog joined to labels by position
  report.html              counts, class histogram, sky map, examples, confusion matrix
  summary.json             the figures above, per-step timings

next, for example (README, "Using it"):
  galaxalign-batch info {model_dir} {store}
  galaxalign-batch search --store {store} --text "barred spiral galaxy with two arms" --model {model_dir}""")
    return 0


def demo_summary(out: Path, model: Path, store: Path, seconds: float, timings, size: str, first_row: int) -> dict:
    """The demo's figures: held-out test accuracy (evaluate), accuracy on the survey's sources with known
    truth (classify + join, as the report counts it), mean pairwise cosine of the store's embeddings,
    and the fraction of each galaxy's nearest neighbours (cosine, itself excluded) of its true class, also
    for the search query's row ``first_row`` alone."""
    import pandas as pd

    from galaxalign_batch.model.checkpoint import read_info
    from galaxalign_batch.store import open_store

    table = json.loads((out / "evaluation" / "table.json").read_text())[0]
    joined = pd.read_parquet(out / "joined.parquet")
    truth = joined["true_class_key"].astype(str).str.strip()
    galaxy = (truth != "star") & joined["store_row"].notna()
    survey_acc = float((joined["label"][galaxy].astype(str) == truth[galaxy]).mean()) if galaxy.any() else None
    st = open_store(store)
    emb = st.read_embeddings().astype(np.float32)
    n = len(emb)
    sims = emb @ emb.T
    mean_cos = float((sims.sum() - np.trace(sims)) / max(n * (n - 1), 1))
    rows = joined["store_row"][galaxy].astype(int).to_numpy()
    keys = truth[galaxy].to_numpy()
    row_class = dict(zip(rows, keys))
    same, first = [], None
    for r, key in zip(rows, keys):
        s = sims[r].copy()
        s[r] = -np.inf
        nb = np.argsort(-s)[:NEIGHBOURS]
        frac = float(np.mean([row_class.get(int(j)) == key for j in nb]))
        same.append(frac)
        if r == first_row:
            first = frac
    info = read_info(model)
    return {
        "size": size, "seconds": round(seconds, 1), "steps": {t: round(sec, 1) for t, sec in timings},
        "model": str(model), "initialised_from": info.get("open_clip", {}).get("initialised_from"),
        "mode": table["mode"], "test_accuracy": round(float(table["primary_accuracy"]), 4),
        "test_method": table["primary"], "test_images": table["n_images"],
        "survey_accuracy": None if survey_acc is None else round(survey_acc, 4),
        "survey_sources_with_truth": int(galaxy.sum()),
        "mean_pairwise_cosine": round(mean_cos, 4), "store_rows": n,
        "neighbour_same_class": round(float(np.mean(same)), 4) if same else None,
        "neighbours_k": NEIGHBOURS,
        "first_query_neighbours_same_class": first,
        "targets": {"test_accuracy": 0.85, "survey_accuracy": 0.80, "mean_pairwise_cosine_max": 0.5,
                    "seconds_max": 480},
    }


def _first_galaxy(store: Path) -> tuple[str, int]:
    """The query of the demo's search and its store row: the source with the smallest object id, so every run
    asks about the same galaxy (row 0 is whichever tile Ray committed first, which varies from run to run)."""
    from galaxalign_batch.store import open_store
    from galaxalign_batch.store.embedding_store import as_str

    ids = as_str(open_store(store).read("object_id"))
    if not len(ids):
        from galaxalign_batch.errors import GalaxAlignError

        raise GalaxAlignError(f"{store}: the store is empty")
    row = int(np.argmin(ids))
    return str(ids[row]), row


def _truth_catalog(sky: Path, path: Path) -> Path:
    """All primary Tractor rows of the simulated survey in one FITS table (a stand-in user catalog)."""
    from astropy.table import Table, vstack

    from galaxalign_batch.survey import layout

    tables = []
    for brick in layout.list_bricks(sky):
        t = Table.read(layout.tractor_path(sky, brick))
        t = t[t["brick_primary"]]
        tables.append(t[["brickname", "objid", "ra", "dec", "type", "true_class_key"]])
    with atomic.replacing(path) as tmp:
        vstack(tables).write(tmp, format="fits", overwrite=True)
    return path


def register(sub) -> None:
    p = sub.add_parser("demo", help="simulate, train, embed, classify, search, join and report on the embedded default",
                       description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); re-running reuses "
                                                      "the simulated sky and the trained model found there "
                                                      "(refused when that sky is of another simulator version)")
    p.add_argument("--size", default="default", choices=list(SETTINGS),
                   help="default: 4 bricks of 1024 px, 1,200 labelled images, 4 align + 9+9 epochs (about 5 minutes on 2 cores); "
                        "small; smallest (CI smoke test)")
    opt.add_seed(p)
    p.add_argument("--from-scratch", action="store_true",
                   help="fine-tune from random weights instead of the shipped foundation (the collapse of issue 13)")
    p.set_defaults(func=run)
