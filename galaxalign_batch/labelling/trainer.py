"""Background retraining: a thread fits a few-shot head on the labelled embeddings every few labels.

Requests never wait for it: they only bump a counter. The thread wakes when ``every`` label changes
(labels, marks, undos) piled up since the last fit and at least two classes have ``min_per_class``
labels, fits :func:`galaxalign_batch.fewshot.fit_head` on the stored embeddings of the labelled rows,
saves the head atomically beside the database (so it can be applied later, like ``fewshot``), records
it in the database, and re-ranks the queue with it (:meth:`ActiveQueue.rescore`).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from galaxalign_batch.labelling.db import LabelDB
from galaxalign_batch.labelling.queue import ActiveQueue, IdIndex
from galaxalign_batch.store import EmbeddingStore

log = logging.getLogger(__name__)


class Trainer:
    """Owns the retraining thread and the head's status (read by ``/api/state``)."""

    def __init__(self, db: LabelDB, queue: ActiveQueue, store: EmbeddingStore, ids: IdIndex, head_path: str, *,
                 kind: str = "linear", every: int = 5, min_per_class: int = 2, seed: int = 0):
        self.db, self.queue, self.store, self.ids = db, queue, store, ids
        self.head_path, self.kind, self.every = head_path, kind, max(1, int(every))
        self.min_per_class, self.seed = max(1, int(min_per_class)), seed
        self._cond = threading.Condition()
        self._changes = 0
        self._force = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        last = db.last_head()
        self.status: dict = {"state": "waiting", "version": last["version"] if last else 0,
                             "n_labels": last["n_labels"] if last else 0,
                             "validation": last["validation"] if last else None,
                             "classes": None, "ranked_by": 0, "error": None, "seconds": None,
                             "message": "", "every": self.every}

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; fit once right away when the labels already allow it (a restarted server)."""
        self._force = self.trainable()[0]
        self._set(message=self.trainable()[1])
        self._thread = threading.Thread(target=self._run, name="label-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def changed(self) -> None:
        """A label, mark or undo was committed (called by request handlers; returns at once)."""
        with self._cond:
            self._changes += 1
            self._cond.notify_all()
        self._set(message=self.trainable()[1])

    def snapshot(self) -> dict:
        with self._cond:
            return dict(self.status, pending=self._changes)

    def _set(self, **kw) -> None:
        with self._cond:
            self.status.update(kw)

    def trainable(self) -> tuple[bool, str]:
        """Whether a head can be fitted now, and a one-line reason for the page."""
        counts = self.db.counts()
        ready = [c for c in self.db.classes if counts[c] >= self.min_per_class]
        if len(ready) >= 2:
            return True, ""
        need = [f"{c}: {self.min_per_class - counts[c]}" for c in self.db.classes if counts[c] < self.min_per_class]
        return False, (f"the first head is fitted once two classes have {self.min_per_class} labels each "
                       f"(still needed: {', '.join(need)})")

    # ---- the thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._force and self._changes < self.every:
                    self._cond.wait()
                if self._stop.is_set():
                    return
                self._force = False
                changes, self._changes = self._changes, 0
            ok, why = self.trainable()
            if not ok:
                self._set(message=why)
                with self._cond:  # keep the count: the next label may make it trainable
                    self._changes += changes
                    if self._changes >= self.every:
                        self._changes = self.every - 1
                continue
            try:
                self.fit_once()
            except Exception as e:  # keep serving; the page shows the error
                log.exception("retraining failed")
                self._set(state="error", error=f"{type(e).__name__}: {e}")

    def fit_once(self) -> dict:
        """Fit, save, record and re-rank (in the calling thread); returns the new status."""
        from galaxalign_batch.fewshot import fit_head

        t0 = time.perf_counter()
        self._set(state="training", error=None)
        counts = self.db.counts()
        classes = [c for c in self.db.classes if counts[c] >= self.min_per_class]
        labels, rows = [], []
        for lab in self.db.labels():  # rows looked up by object id: the database outlives a rebuilt store
            row = self.ids.row(lab.object_id) if lab.kind == "class" and lab.label in classes else None
            if row is not None:
                labels.append(lab)
                rows.append(row)
        rows = np.array(rows, dtype=np.int64)
        order = np.argsort(rows)
        x = np.empty((len(rows), self.store.dim), np.float32)
        x[order] = np.asarray(self.store.read("embedding", rows[order]), dtype=np.float32)
        y = np.array([classes.index(lab.label) for lab in labels], dtype=np.int64)
        source = {"store": os.path.abspath(self.store.path), "model": self.store.attrs.get("model"),
                  "task": self.db.task, "labels_database": self.db.path}
        head = fit_head(x, y, classes=classes, kind=self.kind, seed=self.seed, source=source)
        head.save(self.head_path)  # atomic (temporary file + rename)
        validation = head.validation
        version = self.db.add_head(len(labels), self.kind, self.head_path, validation)
        self._set(state="scoring", version=version, n_labels=len(labels), validation=validation, classes=classes)
        self.queue.rescore(head, version, stop=self._stop)
        self._set(state="ready", ranked_by=version, seconds=round(time.perf_counter() - t0, 2), message="")
        log.info("head v%d on %d labels (%s) in %.1f s; validation %s", version, len(labels), ", ".join(classes),
                 time.perf_counter() - t0, validation)
        return self.snapshot()
