"""Search in three modalities: precision@k of text, drawn-symbol and image queries on held-out galaxies.

    python bench/search_modalities.py [--checkpoint CKPT] [--json PATH] [--work DIR] [--held-per-class 30]

Without ``--checkpoint`` the tiny GalaxAlign is fine-tuned first with the demo's recipe
(``galaxalign-batch demo``: the shipped foundation, simulated labelled set seed 0 with survey-density
neighbours, 120 per class, align 4 + tri-modal 4 + 4 epochs, batch 32, lr 3e-4, align lr 1e-2, one
thread). The store is a fresh simulated labelled set (seed ``--held-seed``, not the training seed:
refused when equal) of ``--held-per-class`` galaxies per class, cut with the checkpoint's CutoutSpec
and embedded by the checkpoint (float16, as a store keeps them) into a real store, searched through
the same code as ``galaxalign-batch search`` (``run_query`` + ``search_store``, exact):

- ``text``: for each class, its label in the vocabulary's first template ("a photo of a barred spiral
  galaxy.") and a free description of the class written here (``DESCRIPTIONS``);
- ``symbol``: the drawer's canonical symbol of the class saved as a PNG drawn dark on white (as a
  user's sketch) and read by ``search --symbol``;
- ``image``: every held-out galaxy of the class as the query (``--object``), itself excluded from its results.

Reported: precision@k (the fraction of the top k of the query's class; chance 0.1) per class and the mean.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DESCRIPTIONS = {
    "disturbed": "an irregular, disturbed galaxy with a lopsided clumpy shape",
    "merging": "two galaxies merging, with tidal tails",
    "round_smooth": "a round smooth elliptical galaxy",
    "in_between_round_smooth": "a slightly elongated smooth galaxy",
    "cigar_smooth": "a cigar-shaped smooth elongated galaxy",
    "barred_spiral": "barred spiral galaxy with two arms",
    "unbarred_tight_spiral": "a spiral galaxy with tightly wound arms and no bar",
    "unbarred_loose_spiral": "a spiral galaxy with loose open arms",
    "edge_on_no_bulge": "a thin edge-on disk galaxy without a bulge",
    "edge_on_with_bulge": "an edge-on disk galaxy with a central bulge",
}


def train_demo_model(work: Path) -> Path:
    from galaxalign_batch.cli import main

    foundation = Path(__file__).resolve().parent.parent / "galaxalign_batch" / "data" / "foundation-tiny.safetensors"
    from galaxalign_batch.model.pretrain import expand_foundation
    from galaxalign_batch.simulate import simulate_labelled

    simulate_labelled(work / "sim", n_per_class=120, stamp_size=152, seed=0, neighbours="survey")
    start = expand_foundation(foundation, work / "foundation" / "model.safetensors")
    argv = ["--no-progress", "train", "--data", str(work / "sim"), "--out", str(work / "model"), "--model", str(start),
            "--mode", "trimodal", "--align-epochs", "4", "--epochs-stage1", "4", "--epochs-stage2", "4",
            "--batch-size", "32", "--lr", "3e-4", "--align-lr", "1e-2", "--threads", "1", "--seed", "0"]
    if main(argv) != 0:
        raise SystemExit("training failed")
    return work / "model" / "model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--work", default="/tmp/bench-search-modalities")
    ap.add_argument("--json")
    ap.add_argument("--held-per-class", type=int, default=30)
    ap.add_argument("--held-seed", type=int, default=20261204)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()

    import torch
    from PIL import Image

    torch.set_num_threads(1)
    from galaxalign_batch.downstream.classify import checkpoint_identity
    from galaxalign_batch.downstream.search import run_query, search_store
    from galaxalign_batch.model.checkpoint import load_checkpoint, read_info
    from galaxalign_batch.model.data import load_dataset
    from galaxalign_batch.model.symbols import draw_symbol
    from galaxalign_batch.preprocess import CutoutSpec
    from galaxalign_batch.simulate import simulate_labelled
    from galaxalign_batch.store import EmbeddingStore, open_store

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint) if args.checkpoint else train_demo_model(work)
    train_seconds = time.perf_counter() - t0
    info = read_info(ckpt)
    train_seed = (info.get("data") or {}).get("seed")
    manifest = Path((info.get("data") or {}).get("manifest", "")) if (info.get("data") or {}).get("manifest") else None
    if manifest and manifest.is_file():
        sim_seed = json.loads(manifest.read_text()).get("params", {}).get("seed")
        if sim_seed == args.held_seed:
            raise SystemExit(f"--held-seed {args.held_seed} is the seed the checkpoint's training set was simulated with")
    m = load_checkpoint(ckpt)
    held = work / f"held-{args.held_seed}-{args.held_per_class}"
    simulate_labelled(held, n_per_class=args.held_per_class, stamp_size=152, seed=args.held_seed, neighbours="survey")
    ds = load_dataset(held, m.vocabulary, spec=CutoutSpec.from_dict(m.info["cutout_spec"]))
    parts = [ds.split(s) for s in ("train", "val", "test")]
    labels = np.concatenate([p.labels for p in parts])
    emb = m.encode_images(np.concatenate([p.images for p in parts])).numpy().astype(np.float16).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(labels)
    path = work / "held.zarr"
    if path.exists():
        import shutil

        shutil.rmtree(path)
    store = EmbeddingStore.create(path, emb.shape[1], attrs={"model": checkpoint_identity(ckpt), "vocabulary": None,
                                                            "cutout_spec": m.info["cutout_spec"]})
    rng = np.random.default_rng(0)
    store.commit([("held", dict(embedding=emb, object_id=np.array([f"held/{i}" for i in range(n)]),
                                ra=rng.uniform(150, 151, n), dec=rng.uniform(2, 3, n), tile=np.full(n, "held"),
                                x=np.zeros(n, np.float32), y=np.zeros(n, np.float32),
                                masked_fraction=np.zeros(n, np.float32)), "")])
    store.finalize()
    store = open_store(path)
    k = args.k
    vocab = m.vocabulary
    res = {"prompt": {}, "description": {}, "symbol": {}, "image": {}}
    t1 = time.perf_counter()
    for c, key in enumerate(vocab.keys):
        def p_at_k(q, skip=None):
            r = search_store(store, q, k + (1 if skip is not None else 0)).rows
            r = [x for x in r if x != skip][:k]
            return float(np.mean(labels[r] == c))

        res["prompt"][key] = p_at_k(run_query(store, text=vocab.prompts(c)[0], model=str(ckpt)))
        res["description"][key] = p_at_k(run_query(store, text=DESCRIPTIONS.get(key, vocab.labels[c]), model=str(ckpt)))
        drawing = (255 * (1 - draw_symbol(key, m.symbols.settings))).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
        png = work / f"sketch-{key}.png"
        Image.fromarray(drawing).resize((256, 256), Image.Resampling.BICUBIC).save(png)
        res["symbol"][key] = p_at_k(run_query(store, symbol=str(png), model=str(ckpt)))
        own = np.flatnonzero(labels == c)
        res["image"][key] = float(np.mean([p_at_k(run_query(store, object_id=f"held/{i}"), skip=i) for i in own]))
    out = {"checkpoint": str(ckpt), "train_seconds": round(train_seconds, 1) if not args.checkpoint else None,
           "held_seed": args.held_seed, "held_per_class": args.held_per_class, "rows": n, "k": k,
           "train_data_seed": train_seed, "search_seconds": round(time.perf_counter() - t1, 1),
           "precision_at_k": res, "mean": {q: float(np.mean(list(v.values()))) for q, v in res.items()}}
    print(json.dumps(out["mean"], indent=1))
    print(f"{'class':<26}" + "".join(f"{q:>13}" for q in res))
    for key in vocab.keys:
        print(f"{key:<26}" + "".join(f"{res[q][key]:>13.2f}" for q in res))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
