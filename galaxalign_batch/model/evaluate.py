"""Evaluation of GalaxAlign checkpoints: zero-shot classification, linear head, similarity search.

Classification methods: ``text`` (nearest text prototype), ``symbol`` (nearest symbol prototype),
``combined`` (normalised sum of both) and ``head`` (the image-only baseline's linear classifier).
Metrics: accuracy, macro-F1 (mean over classes present in the truth or the predictions),
per-class recall, confusion matrix (rows = truth).

Similarity search: every held-out image queries all the others (itself excluded) by cosine
similarity; ``precision@k`` is the mean fraction of same-class images among the top k, and
``mAP@k`` the mean over queries of ``AP@k = sum_{i<=k} P(i) rel(i) / min(k, R)`` with ``R`` the
number of other same-class images (queries with ``R = 0`` are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import IO

import numpy as np
import torch

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.galaxalign import GalaxAlignModel

log = logging.getLogger(__name__)

PRIMARY = {"trimodal": "combined", "image-text": "text", "image-only": "head"}
"""The classification method a mode is judged by in the comparison table."""


def methods_for(model: GalaxAlignModel) -> list[str]:
    """Classification methods that apply to a model: zero-shot ones when its text tower was trained, else its head."""
    if model.mode == "image-only":
        return ["head"]
    return ["text", "symbol", "combined"]


# ---------------------------------------------------------------------------------------------- metrics

def classification_metrics(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
    truth, pred = np.asarray(truth, np.int64), np.asarray(pred, np.int64)
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (truth, pred), 1)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.full(n_classes, np.nan), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    denom = np.where(support > 0, recall, 0) + precision
    f1 = np.divide(2 * precision * np.where(support > 0, recall, 0), denom, out=np.zeros(n_classes), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    return {"accuracy": float(tp.sum() / max(len(truth), 1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
            "confusion": cm.tolist(), "n": int(len(truth))}


def retrieval_metrics(features: torch.Tensor, labels: np.ndarray, ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """Same-class retrieval precision@k and mAP@k among ``features`` (normalised (N, D)), leave-one-out."""
    feats = features.float()
    labels_t = torch.as_tensor(np.asarray(labels), device=feats.device)
    n = len(labels_t)
    kmax = min(max(ks), n - 1)
    if kmax < 1:
        raise ConfigError("similarity search needs at least 2 held-out images")
    relevant_total = torch.bincount(labels_t, minlength=int(labels_t.max()) + 1)[labels_t] - 1
    hits_all = []
    for i in range(0, n, chunk):
        sims = feats[i:i + chunk] @ feats.T
        rows = torch.arange(i, min(i + chunk, n), device=feats.device)
        sims[torch.arange(len(rows)), rows] = -float("inf")
        top = torch.topk(sims, kmax, dim=1).indices
        hits_all.append((labels_t[top] == labels_t[rows, None]).float())
    hits = torch.cat(hits_all)  # (N, kmax)
    out = {}
    cum = hits.cumsum(1)
    ranks = torch.arange(1, kmax + 1, device=feats.device, dtype=torch.float32)
    for k in ks:
        kk = min(k, kmax)
        out[f"precision@{k}"] = float((cum[:, kk - 1] / kk).mean())
        valid = relevant_total > 0
        ap = (cum[:, :kk] / ranks[:kk] * hits[:, :kk]).sum(1) / torch.clamp(relevant_total.float(), max=kk).clamp(min=1)
        out[f"mAP@{k}"] = float(ap[valid].mean()) if valid.any() else 0.0
    return out


# ---------------------------------------------------------------------------------------------- one model

@torch.no_grad()
def predictions(model: GalaxAlignModel, images, batch_size: int = 256) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """(image features, predicted class per image for each method that applies to the model)."""
    feats = model.encode_images(images, batch_size)
    methods = methods_for(model)
    if methods == ["head"]:
        return feats, {"head": model.classify(images, "head", batch_size).argmax(1).cpu().numpy()}
    text, symbol = model.class_prototypes("text"), model.class_prototypes("symbol")
    protos = {"text": text, "symbol": symbol, "combined": torch.nn.functional.normalize(text + symbol, dim=-1)}
    return feats, {m: (feats @ protos[m].T).argmax(1).cpu().numpy() for m in methods}


def quick_accuracy(model: GalaxAlignModel, images, labels: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Validation accuracy of each method that applies (used once per training epoch)."""
    _, preds = predictions(model, images, batch_size)
    return {m: float((p == labels).mean()) for m, p in preds.items()}


@torch.no_grad()
def evaluate_model(model: GalaxAlignModel, images, labels: np.ndarray, ks=(1, 5, 10), batch_size: int = 256) -> dict:
    """All metrics of one model on one labelled image set."""
    t0 = time.perf_counter()
    feats, preds = predictions(model, images, batch_size)
    k = len(model.vocabulary)
    result = {"mode": model.mode, "primary": PRIMARY[model.mode], "n_images": int(len(labels)),
              "classification": {m: classification_metrics(labels, p, k) for m, p in preds.items()},
              "retrieval": retrieval_metrics(feats, labels, ks)}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def plot_confusion(cm: np.ndarray, names: list[str], title: str, path: "str | os.PathLike | IO[bytes]") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    try:
        if hasattr(path, "write"):  # a file object (the report embeds the picture)
            fig.savefig(path, format="png", dpi=110)
        else:
            with atomic.replacing(path) as tmp:
                fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- comparison

def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def comparison_table(results: list[dict], ks=(1, 5, 10)) -> tuple[str, list[dict]]:
    """(Markdown, rows) comparing checkpoints: accuracy per method, primary macro-F1, retrieval."""
    rows = []
    for r in results:
        cls = r["classification"]
        prim = cls[r["primary"]]
        row = {"checkpoint": r["name"], "mode": r["mode"], "stretch": r.get("stretch"), "primary": r["primary"],
               "acc_text": cls.get("text", {}).get("accuracy"), "acc_symbol": cls.get("symbol", {}).get("accuracy"),
               "acc_combined": cls.get("combined", {}).get("accuracy"), "acc_head": cls.get("head", {}).get("accuracy"),
               "primary_accuracy": prim["accuracy"], "primary_macro_f1": prim["macro_f1"],
               **{f"precision@{k}": r["retrieval"][f"precision@{k}"] for k in ks},
               **{f"mAP@{k}": r["retrieval"][f"mAP@{k}"] for k in ks}, "n_images": r["n_images"]}
        rows.append(row)
    kcols = [f"P@{k}" for k in ks] + [f"mAP@{k}" for k in ks]
    head = ["checkpoint", "mode", "stretch", "acc text", "acc symbol", "acc text+symbol", "acc linear head",
            "primary acc", "primary macro-F1", *kcols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for row in rows:
        vals = [row["checkpoint"], row["mode"], row["stretch"] or "—", _fmt(row["acc_text"]), _fmt(row["acc_symbol"]), _fmt(row["acc_combined"]),
                _fmt(row["acc_head"]), f"{_fmt(row['primary_accuracy'])} ({row['primary']})", _fmt(row["primary_macro_f1"]),
                *[_fmt(row[f"precision@{k}"]) for k in ks], *[_fmt(row[f"mAP@{k}"]) for k in ks]]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n", rows


def evaluate_checkpoints(checkpoints: list[str], data: str, out: str | os.PathLike, *, split: str = "test",
                         ks=(1, 5, 10), batch_size: int = 256, device: str = "cpu",
                         names: list[str] | None = None, force_unlock: bool = False, stretch: str | None = None) -> dict:
    """Evaluate each checkpoint on the same split of ``data``; write metrics.json, table.md/json, confusion PNGs.

    ``stretch``: cut the data in this stretch instead of each checkpoint's own (survey pixels only: the
    simulator's labelled set, labels on a store); how a model reads pictures another pipeline stretched.

    Holds ``out``'s lease (:mod:`galaxalign_batch.lease`): two evaluations into one folder would leave one's
    table beside the other's confusion matrices."""
    if not checkpoints:
        raise ConfigError("evaluate needs at least one checkpoint (--checkpoints A [B ...])")
    out = Path(out)
    with lease.locked(out, force=force_unlock):
        return _evaluate(checkpoints, data, out, split=split, ks=ks, batch_size=batch_size, device=device,
                         names=names, stretch=stretch)


def _evaluate(checkpoints: list[str], data: str, out: Path, *, split: str, ks, batch_size: int, device: str,
              names: list[str] | None, stretch: str | None = None) -> dict:
    from galaxalign_batch.model.checkpoint import load_checkpoint
    from galaxalign_batch.model.data import check_restretchable, load_dataset, source_kind
    from galaxalign_batch.model.store_labels import is_label_file
    from galaxalign_batch.preprocess import CutoutSpec

    if stretch:  # a label file of store objects takes its store from the checkpoint (below)
        check_restretchable("store-labels" if is_label_file(data) else source_kind(data), data, f"--stretch {stretch}")
    out.mkdir(parents=True, exist_ok=True)
    names = names or _unique_names(checkpoints)
    split_ref, results, cache = None, [], {}
    for ckpt, name in zip(checkpoints, names):
        model = load_checkpoint(ckpt, device=device)
        training = model.info.get("training", {})
        split_settings = {k: training.get(k, d) for k, d in (("seed", 0), ("val_fraction", 0.1), ("test_fraction", 0.1))}
        split_ref = split_ref or split_settings
        if split_settings != split_ref:
            log.warning("%s was trained with split settings %s; evaluating on the split of the first checkpoint %s",
                        name, split_settings, split_ref)
        spec = CutoutSpec.from_dict(model.info["cutout_spec"])
        if stretch:
            spec = dataclasses.replace(spec, stretch=stretch)
        key = (json.dumps(spec.to_dict(), sort_keys=True), model.vocabulary.digest())
        if key not in cache:  # checkpoints with the same preprocessing share the loaded images
            # a label file of store objects: the store (and survey roots) the checkpoint was trained on
            on_store = {"store": training.get("store"), "survey": training.get("survey")} \
                if is_label_file(data) and training.get("store") else {}
            cache[key] = load_dataset(data, model.vocabulary, spec=spec, **split_ref, **on_store).split(split)
        subset = cache[key]
        log.info("evaluating %s (%s) on %d %s images", name, model.mode, len(subset), split)
        r = evaluate_model(model, subset.images, subset.labels, ks, batch_size)
        r.update(name=name, checkpoint=str(Path(ckpt).resolve()), split=split, data=str(Path(data).resolve()),
                 stretch=spec.stretch, trained_stretches=[model.info["cutout_spec"].get("stretch"),
                                                          *training.get("stretch_augment", [])],
                 vocabulary=model.vocabulary.name, weights_digest=model.info.get("weights_digest"),
                 training_epochs=_epochs(training), training_seconds=model.info.get("train_seconds"))
        for m, metrics in r["classification"].items():
            png = out / f"confusion_{name}_{m}.png"
            plot_confusion(np.array(metrics["confusion"]), model.vocabulary.keys,
                           f"{name} ({model.mode}), {m}: acc {metrics['accuracy']:.3f}", png)
            metrics["confusion_png"] = png.name
        results.append(r)
    md, rows = comparison_table(results, ks)
    atomic.write_json(out / "metrics.json", results)
    atomic.write_json(out / "table.json", rows)
    atomic.write_text(out / "table.md", md)
    return {"results": results, "table_md": md, "rows": rows}


def _epochs(training: dict):
    if not training:
        return None
    if training.get("mode") == "trimodal":
        return [training.get("epochs_stage1"), training.get("epochs_stage2")]
    return training.get("epochs")


def _unique_names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        p = Path(p)
        base = p.name if p.is_dir() else (p.parent.name if p.name == "model.safetensors" else p.stem)
        n, i = base, 2
        while n in names:
            n, i = f"{base}-{i}", i + 1
        names.append(n)
    return names
