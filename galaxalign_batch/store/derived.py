"""Derived results: per-row arrays computed from a store and written into it, resumable, never half-visible.

One writer for every command that adds a result to a store (``classify``, ``fewshot --apply``, and
any later one); docs/store.md, "Derived results". A result is a few arrays with one row per store
row (``probs`` (N, K), ``label`` (N,), ...) plus an entry in a root attribute that describes it.
:class:`DerivedWriter` writes them in this order:

1. the arrays are created in a **work area** (a partial group such as ``_classify_partial``) whose
   attribute ``signature`` says what is being computed (model, method, classes, rows ...);
2. rows are written in batches of whole chunks, each batch followed by an update of the work
   area's ``rows_done`` attribute (one whole-file replace): the commit point of the batch. A killed
   run finds the work area with the same signature and resumes at ``rows_done``; a work area with
   another signature is discarded and the work starts over;
3. **install**: the result's attribute entry is set to null (readers stop trusting the old result),
   the finished arrays are renamed into place, the entry is set to the new metadata, the work area
   is removed. A kill between these steps leaves no entry (readers see no result) and the re-run
   computes it again.

Every file goes through the store's write path (:mod:`galaxalign_batch.store.io`: whole-file
replaces, fault injection in tests); the writer holds the store's lock (``locked``) and checks it
before each step.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from galaxalign_batch.store import io as store_io
from galaxalign_batch import lease
from galaxalign_batch.store.embedding_store import EmbeddingStore, StoreError

__all__ = ["DerivedArray", "DerivedWriter", "ModelMismatchError", "probability_arrays", "probability_columns",
           "label_counts"]

log = logging.getLogger(__name__)


class ModelMismatchError(StoreError):
    """A model (or a head made on a model's embeddings) that is not the one the store was embedded with."""


@dataclass(frozen=True)
class DerivedArray:
    """One array of a derived result: ``(N,)``, or ``(N, width)`` when ``width`` is given.

    Parameters
    ----------
    name : str
        The array's name inside the result.
    dtype : str
        numpy dtype.
    fill_value : int or float
        Zarr fill value.
    description : str
        Stored as the array's ``description`` attribute.
    width : int, optional
        Columns of a 2-d array (its second dimension is named ``dimension``).
    dimension : str
        Name of the second dimension.
    """

    name: str
    dtype: str
    fill_value: Any
    description: str
    width: int | None = None
    dimension: str = "column"


def probability_arrays(k: int, probs_description: str) -> list[DerivedArray]:
    """The arrays of a classification: ``probs`` (N, k) float32, ``label`` (N,) int16, ``confidence`` (N,) float32."""
    return [DerivedArray("probs", "float32", 0.0, probs_description, width=int(k), dimension="class"),
            DerivedArray("label", "int16", -1, "index of the most probable class"),
            DerivedArray("confidence", "float32", 0.0, "probability of the label")]


def probability_columns(probs: np.ndarray) -> dict[str, np.ndarray]:
    """The values of :func:`probability_arrays` for a batch of probabilities ``(n, k)``."""
    probs = np.asarray(probs, dtype=np.float32)
    label = probs.argmax(1)
    return {"probs": probs, "label": label.astype(np.int16), "confidence": probs[np.arange(len(label)), label]}


class DerivedWriter:
    """Write one derived result into a store: resumable row batches in a work area, then installed.

    Parameters
    ----------
    store : EmbeddingStore
        Opened ``"r+"`` by the holder of its lock (:func:`galaxalign_batch.lease.locked`).
    dest : str
        Where the result's arrays end up: ``""`` for the store's root (each array renamed into
        place), or a group path such as ``"fewshot/spiral"`` (the group renamed into place).
    partial : str
        The work area's group path, e.g. ``"_classify_partial"`` or ``"_fewshot_partial/spiral"``.
    arrays : sequence of DerivedArray
        The result's arrays (one row per committed row of the store).
    signature : mapping
        What is computed (JSON values). A work area with the same signature is resumed.
    attr : str
        The root attribute that describes the result.
    entry : str, optional
        The key inside ``attr`` (a dict of results, e.g. ``fewshot`` by head name); None when
        ``attr`` describes one result.
    parent_description : str, optional
        ``description`` of the group holding ``dest`` when it has to be created.
    what : str
        How log lines name the result.

    Examples
    --------
    >>> with locked(path):                                                       # doctest: +SKIP
    ...     store = open_store(path, "r+")
    ...     w = DerivedWriter(store, dest="", partial="_mine_partial",
    ...                       arrays=[DerivedArray("score", "float32", 0.0, "my score")],
    ...                       signature={"rows": store.n_rows}, attr="mine")
    ...     w.begin()
    ...     w.write(lambda a, b: {"score": store.read("ra", slice(a, b)) / 360})
    ...     w.install({"rows": store.n_rows})
    """

    def __init__(self, store: EmbeddingStore, *, dest: str, partial: str, arrays: Sequence[DerivedArray],
                 signature: Mapping[str, Any], attr: str, entry: str | None = None,
                 parent_description: str | None = None, what: str = "result"):
        if not partial or partial == dest:
            raise ValueError("the work area must be a group of its own")
        self.store = store
        self.dest = dest.strip("/")
        self.partial = partial.strip("/")
        self.arrays = list(arrays)
        self.signature = dict(signature)
        self.attr, self.entry = attr, entry
        self.parent_description = parent_description
        self.what = what
        self.n = int(store.n_rows)
        self._part = None
        self._done = 0

    # ---- the store's write path ----------------------------------------------------------------------------
    def _writer(self):
        w = getattr(self.store, "_writer", None)
        if w is None:
            raise StoreError(f"{self.store.path}: opened read-only")
        return w

    def _check(self) -> None:
        self._writer()
        lease.check_writable(self.store.path)

    def _remove_dir(self, key: str) -> None:
        path = os.path.join(self.store.path, key)
        if os.path.lexists(path):
            store_io._hook(self._writer(), f"delete {key}")
            shutil.rmtree(path)

    def _rename(self, src: str, dst: str) -> None:
        store_io._hook(self._writer(), f"rename {src} -> {dst}")
        os.rename(os.path.join(self.store.path, src), os.path.join(self.store.path, dst))

    def _set_entry(self, value) -> None:
        g = self.store.group
        if self.entry is None:
            g.attrs.update({self.attr: value})
        else:
            entries = dict(g.attrs.get(self.attr) or {})
            entries[self.entry] = value
            g.attrs.update({self.attr: entries})

    # ---- the work area ----------------------------------------------------------------------------------------
    @property
    def rows_done(self) -> int:
        """Rows written to the work area so far (its commit point)."""
        return self._done

    def begin(self) -> int:
        """Resume the work area when its signature matches (returns the rows already done), else start it anew."""
        self._check()
        g = self.store.group
        if self.partial in g:
            part = g[self.partial]
            if (dict(part.attrs).get("signature") == self.signature
                    and all(a.name in part for a in self.arrays)):
                self._part, self._done = part, int(part.attrs.get("rows_done", 0))
                return self._done
            log.info("%s: discarding an unfinished %s", self.store.path, self.what)
            self._remove_dir(self.partial)
        parent = g
        *parents, leaf = self.partial.split("/")
        for p in parents:
            parent = parent.require_group(p)
        part = parent.create_group(leaf)
        chunk, shard = self.store.chunking
        for a in self.arrays:
            if a.width is None:
                part.create_array(a.name, shape=(self.n,), chunks=(chunk,), shards=(shard,), dtype=a.dtype,
                                  fill_value=a.fill_value, dimension_names=("row",),
                                  attributes={"description": a.description})
            else:
                part.create_array(a.name, shape=(self.n, a.width), chunks=(chunk, a.width), shards=(shard, a.width),
                                  dtype=a.dtype, fill_value=a.fill_value, dimension_names=("row", a.dimension),
                                  attributes={"description": a.description})
        part.attrs.update({"signature": self.signature, "rows_done": 0})
        self._part, self._done = part, 0
        return 0

    def discard(self) -> None:
        """Remove the work area (an up-to-date result needs none)."""
        self._check()
        self._remove_dir(self.partial)
        self._part = None

    def batches(self, step: int | None = None) -> list[tuple[int, int]]:
        """The ``(start, stop)`` row batches :meth:`write` will ask ``compute`` for, in order (rows not yet done;
        ``step`` rounded down to whole chunks, at least one, default one shard), so that they can be computed
        ahead, e.g. as tasks on a cluster."""
        chunk, shard = self.store.chunking
        step = max(chunk, int(step or shard) // chunk * chunk)
        return [(start, min(start + step, self.n)) for start in range(self._done, self.n, step)]

    def write(self, compute: Callable[[int, int], Mapping[str, np.ndarray]], *, step: int | None = None,
              desc: str | None = None) -> None:
        """Compute and write rows ``rows_done..N`` in batches of whole chunks.

        Parameters
        ----------
        compute : callable
            ``compute(start, stop)`` returns every array's values for rows ``[start, stop)``.
        step : int, optional
            Rows per batch, rounded down to whole chunks (at least one chunk); default one shard, so
            every chunk is written once.
        desc : str, optional
            Label of the progress bar.
        """
        from galaxalign_batch import progress

        if self._part is None:
            raise RuntimeError("DerivedWriter.write before begin()")
        bar = progress.bar(total=self.n, initial=self._done, desc=desc or self.what, unit="row")
        try:
            for start, stop in self.batches(step):
                values = compute(start, stop)
                missing = {a.name for a in self.arrays} - set(values)
                if missing:
                    raise ValueError(f"{self.what}: no values for {sorted(missing)}")
                self._check()
                for a in self.arrays:
                    v = np.asarray(values[a.name])
                    want = (stop - start,) if a.width is None else (stop - start, a.width)
                    if v.shape != want:
                        raise ValueError(f"{self.what}: {a.name} has shape {v.shape}, expected {want}")
                    self._part[a.name][start:stop] = v.astype(a.dtype, copy=False)
                self._part.attrs.update({"rows_done": stop})  # the commit point of this batch
                self._done = stop
                bar.update(stop - start)
        finally:
            bar.close()

    def install(self, meta: Mapping[str, Any]) -> None:
        """Move the finished arrays into place and describe them with ``meta`` (every row must be done).

        Re-entrant in effect: a kill between the steps leaves no attribute entry, so readers see no
        result, and the re-run computes it again.
        """
        if self._part is None or self._done != self.n:
            raise RuntimeError(f"{self.what}: {self._done} of {self.n} rows written; install needs every row")
        self._check()
        self._set_entry(None)
        g = self.store.group
        if not self.dest:
            for a in self.arrays:
                src = f"{self.partial}/{a.name}"
                if os.path.isdir(os.path.join(self.store.path, src)):
                    self._remove_dir(a.name)
                    self._rename(src, a.name)
        else:
            *parents, _ = self.dest.split("/")
            parent = g
            for i, p in enumerate(parents):
                if p not in parent:
                    attrs = {"description": self.parent_description} if self.parent_description and i == len(parents) - 1 else None
                    parent = parent.create_group(p, attributes=attrs)
                else:
                    parent = parent[p]
            self._remove_dir(self.dest)
            self._rename(self.partial, self.dest)
        self._set_entry(dict(meta))
        if not self.dest:
            self._remove_dir(self.partial)
        # the work area's parents (``_fewshot_partial``) go once they hold no other work
        *parents, _ = self.partial.split("/")
        while parents:
            key = "/".join(parents)
            path = os.path.join(self.store.path, key)
            if os.path.isdir(path) and not [e for e in os.listdir(path) if e != "zarr.json"]:
                self._remove_dir(key)
            parents.pop()
        self._part = None


def label_counts(store: EmbeddingStore, name: str, classes: Sequence[str]) -> dict[str, int]:
    """How many committed rows have each label in the store's label array ``name`` (read a shard at a time).

    Parameters
    ----------
    store : EmbeddingStore
        The store.
    name : str
        Path of an int label array (``"label"``, ``"fewshot/spiral/label"``); -1 means no label.
    classes : sequence of str
        The class of each label index.

    Returns
    -------
    dict of str to int
        Rows per class, in the order of ``classes``.
    """
    k = len(classes)
    total = np.zeros(k, np.int64)
    for _, cols in store.iter_chunks([name]):
        lab = np.asarray(cols[name], dtype=np.int64)
        total += np.bincount(lab[lab >= 0], minlength=k)[:k]
    return {c: int(v) for c, v in zip(classes, total)}


def count_lines(classes: Sequence[str], counts: dict[str, int], rows: int) -> list[str]:
    """``label_counts`` as the lines a command prints: class, rows, share of all rows (``classify``,
    ``fewshot --apply``)."""
    width = max((len(c) for c in classes), default=0)
    return [f"  {c:<{width}}  {counts.get(c, 0):>10d}  {100.0 * counts.get(c, 0) / max(rows, 1):5.1f}%"
            for c in classes]
