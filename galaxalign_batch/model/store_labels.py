"""A training set from labels on a store: ``object_id,label`` rows (``label --export``) cut from the store's tiles.

The human-in-the-loop circle: label galaxies of a store in the browser (``label``), export the
labels, fine-tune on them (``train --data labels.csv --store STORE``), embed again with the new
checkpoint, and label on the new store (object ids are the same when the same tiles are embedded).

A store keeps no pixels: each labelled object's cutout is re-made from the tile the store records
for it (``tile``, ``x``, ``y``: :meth:`EmbeddingStore.cutouts`) with the **training run's**
:class:`CutoutSpec` (the cutouts the fine-tuned model will be embedded with), exactly as ``embed``
cuts them. Labels name classes of the run's vocabulary by key or label text. Splits are stratified
per class with the run's seed and fractions, as for folders and CSVs of pictures.

Two ways to name the store:

- ``--data labels.csv --store STORE.zarr`` (``TrainConfig.store``; ``--survey ROOT`` where the
  store's bricks are looked for, as ``search --plot`` does);
- a **data spec**: a JSON file ``{"labels": "labels.csv", "store": "sky.zarr", "survey": ["runs/sky"]}``
  (paths relative to the spec's folder) given as ``--data spec.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["is_label_file", "is_data_spec", "read_data_spec", "load_store_labels"]

BATCH = 2048  # rows cut per pass (one tile opener kept across passes)


def is_label_file(path: str | os.PathLike) -> bool:
    """A CSV whose header names ``object_id`` and ``label`` (what ``label --export`` writes)."""
    p = Path(path)
    if not (p.is_file() and p.suffix.lower() == ".csv"):
        return False
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    names = [h.strip().strip('"').lower() for h in first.strip().split(",")]
    return "object_id" in names and "label" in names and "filepath" not in names


def is_data_spec(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".json"


def read_data_spec(path: str | os.PathLike) -> tuple[str, str, list[str]]:
    """``(labels, store, survey roots)`` of a data spec, paths resolved against the spec's folder."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{p}: not a readable JSON data spec ({e})") from None
    if not isinstance(spec, dict) or not spec.get("labels") or not spec.get("store"):
        raise ConfigError(f"{p}: a data spec is a JSON object with 'labels' (an object_id,label CSV) and 'store' "
                          "(the store those ids are from), optionally 'survey' (roots of the store's bricks)")
    survey = spec.get("survey") or []
    if isinstance(survey, str):
        survey = [survey]

    def rel(x: str) -> str:
        return str(x) if os.path.isabs(str(x)) else str(p.parent / str(x))

    return rel(spec["labels"]), rel(spec["store"]), [rel(s) for s in survey]


def load_store_labels(labels: str | os.PathLike, store_path: str | os.PathLike, vocab, spec, *,
                      roots: Sequence[str] | None = None, extra_specs: Sequence = ()) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cutouts and class indices of the labelled objects of a store.

    Parameters
    ----------
    labels : path
        CSV with a header naming ``object_id`` and ``label`` (other columns ignored).
    store_path : path
        The store the ids are from.
    vocab : Vocabulary
        The run's classes; every label must be one (key or label text, case-insensitive).
    spec : CutoutSpec
        The run's cutouts.
    roots : sequence of str, optional
        Survey roots of the store's bricks (before the store's own ``survey_roots``).
    extra_specs : sequence of CutoutSpec, optional
        Other specs (same size, other stretches: ``train --stretch-augment``) the objects are also cut
        with, from the same tile reads.

    Returns
    -------
    images : (n, 3, S, S) uint8 or float16; with ``extra_specs`` a list, ``spec``'s first, then one per extra spec
    labels : (n,) int64
    description : dict
        What the data was (recorded in the checkpoint's ``info["data"]``).

    Raises
    ------
    ConfigError
        An unreadable label file, a label that is no class of the vocabulary, ids not in the store.
    StoreError, TileError
        No such store; a labelled object's tile cannot be found or read (``--survey ROOT``).
    """
    from galaxalign_batch.fewshot.labels import read_labels, rows_of
    from galaxalign_batch.store import open_readable

    labelset = read_labels(labels)
    y_of_class = {}
    unknown = []
    for c in labelset.classes:
        try:
            y_of_class[c] = vocab.index(c)
        except ConfigError:
            unknown.append(c)
    if unknown:
        raise ConfigError(f"{labels}: label(s) {', '.join(map(repr, unknown))} are not classes of the vocabulary "
                          f"{vocab.name!r} ({', '.join(vocab.keys)}); train with --vocabulary FILE.toml naming them "
                          "(and --symbols DIR for a tri-modal run, or --mode image-text)")
    y = np.array([y_of_class[labelset.classes[i]] for i in labelset.y], np.int64)
    store = open_readable(store_path)
    rows = rows_of(store, labelset.object_ids, what=str(labels))
    dtype = np.uint8 if spec.dtype == "uint8" else np.float16
    specs = [spec, *extra_specs]
    versions = [np.empty((len(rows), 3, spec.out_size, spec.out_size), dtype) for _ in specs]
    opener = store.tile_opener(roots, keep=4)
    from galaxalign_batch.progress import bar

    order = np.argsort(rows, kind="stable")  # tile by tile, as the store keeps its rows
    for start in bar(range(0, len(order), BATCH), total=-(-len(order) // BATCH), desc="cutting labelled objects",
                     unit="batch"):
        sel = order[start:start + BATCH]
        for one, images in zip(specs, versions):
            cut = store.cutouts(rows[sel], one, opener=opener, strict=True)
            for i in sel:
                p = np.asarray(cut[int(rows[i])])
                images[i] = p if p.dtype == dtype else p.astype(dtype)
    counts = {vocab.keys[c]: int(n) for c, n in enumerate(np.bincount(y, minlength=len(vocab))) if n}
    desc = {"labels": str(Path(labels).resolve()), "store": store.path, "store_model": store.attrs.get("model"),
            "store_rows": int(store.n_rows), "objects": int(len(rows)), "counts": counts,
            "image_scale": f"cutouts re-made from the store's tiles with the run's CutoutSpec "
                           f"({spec.angular_size}\" at {spec.out_size} px, {spec.stretch})"}
    log.info("%s: %d labelled objects of %s cut from their tiles (%s)", labels, len(rows), store.path,
             ", ".join(f"{k} {n}" for k, n in counts.items()))
    return (versions if extra_specs else versions[0]), y, desc
