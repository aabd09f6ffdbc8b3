"""Putting a labelling task together: where its files live, and the app that serves it.

Files of task ``NAME`` on store ``sky.zarr`` (``--db`` moves them all beside the given database):

- ``sky.zarr.labels/NAME.sqlite`` (+ ``-wal``, ``-shm``): the labels and their history (db.py);
- ``sky.zarr.labels/NAME.head.safetensors``: the newest head, as :meth:`galaxalign_batch.fewshot.Head.save` writes it;
- ``sky.zarr.labels/clusters.npz``: the k-means clustering of the store (shared by its tasks, remade when
  the store's rows or model change).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.labelling.db import LabelDB, check_classes
from galaxalign_batch.store import EmbeddingStore, StoreError, open_readable

log = logging.getLogger(__name__)

TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TaskPaths:
    db: str
    head: str
    clusters: str

    @classmethod
    def for_task(cls, store_path: str, task: str, db: str | None = None) -> "TaskPaths":
        if not TASK_RE.match(task or ""):
            raise ConfigError(f"task name {task!r}: 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                              "or digit")
        if db:
            db = os.path.abspath(db)
            side = os.path.dirname(db)
            stem = os.path.splitext(os.path.basename(db))[0]
            return cls(db, os.path.join(side, stem + ".head.safetensors"), os.path.join(side, "clusters.npz"))
        side = os.path.abspath(os.fspath(store_path)).rstrip(os.sep) + ".labels"
        return cls(os.path.join(side, task + ".sqlite"), os.path.join(side, task + ".head.safetensors"),
                   os.path.join(side, "clusters.npz"))


def parse_classes(text: str | None) -> list[str] | None:
    """``"ring,not-ring"`` -> ``["ring", "not-ring"]`` (validated), None when not given."""
    if text is None:
        return None
    return check_classes(text.split(","))


def open_embedding_store(path: str) -> EmbeddingStore:
    """The store to label: it must exist, be an embedding store and have committed embeddings."""
    if not os.path.exists(path):
        raise StoreError(f"{path}: no such store")
    store = open_readable(path)
    if "embedding" not in store:
        raise StoreError(f"{path}: the store has no 'embedding' array (not written by 'galaxalign-batch embed'?)")
    return store


def store_classes(store: EmbeddingStore) -> list[str] | None:
    """The class keys of the store's vocabulary (the checkpoint it was embedded with), if any."""
    voc = store.attrs.get("vocabulary") or {}
    keys = [c.get("key") for c in voc.get("classes", []) if isinstance(c, dict)]
    return keys if len(keys) >= 2 and all(keys) else None


def open_db(store_path: str, task: str, classes: list[str] | None, db: str | None, *,
            must_exist: bool = False, store: EmbeddingStore | None = None) -> LabelDB:
    paths = TaskPaths.for_task(store_path, task, db)
    if must_exist and not os.path.exists(paths.db):
        raise ConfigError(f"task {task!r} has no label database at {paths.db} (label something first, or pass --db)")
    if classes is None and not os.path.exists(paths.db) and store is not None:
        classes = store_classes(store)
        if classes:
            log.info("task %r: classes from the store's vocabulary: %s (use --classes to choose others)",
                     task, ", ".join(classes))
    return LabelDB(paths.db, task, classes, store_path)


def build_app(store_path: str, task: str, classes: list[str] | None = None, *, db: str | None = None,
              roots: list[str] | None = None, token: str | None = None, retrain_every: int = 5,
              head_kind: str = "linear", min_per_class: int = 2, lease_s: float = 600.0,
              n_clusters: int | None = None, seed: int = 0):
    """Open everything a labelling server needs; the trainer is created but not started."""
    from galaxalign_batch.labelling.queue import ActiveQueue, Clusters, IdIndex
    from galaxalign_batch.labelling.server import LabelApp
    from galaxalign_batch.labelling.trainer import Trainer

    store = open_embedding_store(store_path)
    paths = TaskPaths.for_task(store_path, task, db)
    ldb = open_db(store_path, task, classes, db, store=store)
    ids = IdIndex(store)
    labelled, unknown = [], 0
    for lab in ldb.labels():
        row = ids.row(lab.object_id)
        if row is None:
            unknown += 1
        else:
            labelled.append(row)
    if unknown:
        log.warning("%d label(s) of task %r name objects that are no longer in the store; they are kept but unused",
                    unknown, task)
    clusters = Clusters.cached(store, paths.clusters, k=n_clusters, seed=seed)
    queue = ActiveQueue(store, clusters, labelled, lease_s=lease_s)
    trainer = Trainer(ldb, queue, store, ids, paths.head, kind=head_kind, every=retrain_every,
                      min_per_class=min_per_class, seed=seed)
    return LabelApp(store, ldb, ids, queue, trainer, token=token, roots=roots)
