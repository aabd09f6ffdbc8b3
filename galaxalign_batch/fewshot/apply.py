"""Apply a few-shot head to every row of a store, resumable and never half-written (as ``classify`` does).

Layout (beside, never over, ``classify``'s ``probs``/``label``/``confidence``):

- ``fewshot/<name>/probs`` (N, K) float32, ``fewshot/<name>/label`` (N,) int16,
  ``fewshot/<name>/confidence`` (N,) float32, with the store's row chunking and sharding;
- the store attribute ``fewshot`` = ``{name: {classes, kind, head (digest), head_file, rows, validation,
  counts, temperature, model, created, software_version}}``; readers use a head's arrays only when
  its ``rows`` equals the store's ``rows_committed``.

The arrays are first written under ``_fewshot_partial/<name>/`` in batches of whole chunks, each
followed by an atomic update of that group's ``rows_done`` attribute, so a killed run resumes there
(same head, same row count) and starts over otherwise. When every row is done the group is renamed
to ``fewshot/<name>`` and the attribute entry is set; until then readers see the previous result.
The store's :class:`~galaxalign_batch.store.DerivedWriter` does the writing (docs/store.md, "Derived results").
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.fewshot.heads import Head
from galaxalign_batch.fewshot.labels import check_embeddings
from galaxalign_batch.store import (DerivedWriter, EmbeddingStore, ModelMismatchError, StoreError, count_lines,
                                    label_counts, open_store, probability_arrays, probability_columns)

log = logging.getLogger(__name__)

GROUP = "fewshot"
PARTIAL = "_fewshot_partial"
ATTR = "fewshot"
ARRAYS = ("probs", "label", "confidence")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ApplySummary:
    store: str
    name: str
    rows: int
    classes: list[str]
    counts: dict[str, int]
    seconds: float
    resumed_from: int = 0
    up_to_date: bool = False

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"{self.store}: head {self.name!r} already applied to its {self.rows} rows; nothing to do "
                    "(--force to redo)"]
        head = (f"{self.store}: head {self.name!r} applied to {self.rows} rows in {self.seconds:.1f} s -> "
                f"{GROUP}/{self.name}/{{probs,label,confidence}}")
        if self.resumed_from:
            head += f" (resumed at row {self.resumed_from})"
        return [head] + count_lines(self.classes, self.counts, self.rows)


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ConfigError(f"head name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit)")
    return name


def head_name(path: str | os.PathLike) -> str:
    """The default name of a head in the store: its file name without the suffix, made safe."""
    stem = os.path.basename(os.fspath(path)).split(".")[0] or "head"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:64]


def check_head_fits(head: Head, store: EmbeddingStore) -> None:
    """Refuse a head made on another model's embeddings or another dimension."""
    if head.dim != store.dim:
        raise ModelMismatchError(f"{store.path}: the head takes {head.dim}-d embeddings, the store has {store.dim}-d")
    want = (head.source.get("model") or {}).get("id")
    have = (store.attrs.get("model") or {}).get("id")
    if want and have and want != have:
        raise ModelMismatchError(f"{store.path}: the head was fitted on embeddings of another model (id {want}); "
                                 f"this store was embedded with {have}")


def store_source(store: EmbeddingStore) -> dict:
    """What :attr:`Head.source` records about a store."""
    return {"store": os.path.abspath(store.path), "model": store.attrs.get("model"), "dim": store.dim,
            "rows": store.n_rows}


def fewshot_results(store: EmbeddingStore) -> dict[str, dict]:
    """The heads applied to every committed row of the store: ``{name: metadata}``."""
    meta = store.attrs.get(ATTR) or {}
    return {name: m for name, m in meta.items()
            if m and int(m.get("rows", -1)) == store.n_rows and f"{GROUP}/{name}/probs" in store}


def apply_head(path: str | os.PathLike, head: Head, name: str, *, head_file: str | None = None,
               batch_rows: int | None = None, force: bool = False, force_unlock: bool = False,
               address: str | None = None) -> ApplySummary:
    """Write the head's probabilities for every committed row of the store at ``path`` (module docstring).

    Holds the store's lock (one writer per store, docs/store.md) while it runs. ``address``: the row batches
    are computed as Ray tasks on that cluster and written here, in order.
    """
    from galaxalign_batch.lease import locked

    with locked(path, force_unlock):
        return _apply_head(path, head, name, head_file=head_file, batch_rows=batch_rows, force=force,
                           address=address)


def head_columns(start: int, stop: int, store_path: str, head: Head) -> dict[str, np.ndarray]:
    """Task (any node): the head's ``probs``, ``label``, ``confidence`` for store rows [start, stop)."""
    store = open_store(store_path)
    return probability_columns(head.predict_proba(np.asarray(store.read_embeddings(slice(start, stop)),
                                                             dtype=np.float32)))


def _apply_head(path, head: Head, name: str, *, head_file, batch_rows, force, address=None) -> ApplySummary:
    t0 = time.perf_counter()
    name = check_name(name)
    store = open_store(path, "r+")
    if not os.path.isdir(store.path):
        raise StoreError(f"{store.path}: fewshot writes into local stores only")
    check_embeddings(store)
    check_head_fits(head, store)
    n = store.n_rows
    current = (store.attrs.get(ATTR) or {}).get(name)
    if (not force and current and current.get("head") == head.digest and int(current.get("rows", -1)) == n
            and f"{GROUP}/{name}/probs" in store):
        _writer(store, head, name, n).discard()
        return ApplySummary(store.path, name, n, list(head.classes), _counts(store, name, len(head.classes)),
                            time.perf_counter() - t0, up_to_date=True)

    writer = _writer(store, head, name, n)
    done = writer.begin()
    resumed = done
    if done:
        log.info("%s: resuming head %r at row %d of %d", store.path, name, done, n)
    if address:
        from galaxalign_batch.downstream.distributed import make_executor, ordered_batches

        with make_executor(address) as ex:
            writer.write(ordered_batches(ex, head_columns, writer.batches(batch_rows), store.path, head),
                         step=batch_rows, desc=f"fewshot {name} ({ex.slots} Ray CPUs)")
    else:
        writer.write(lambda start, stop: probability_columns(head.predict_proba(
                         np.asarray(store.read_embeddings(slice(start, stop)), dtype=np.float32))),
                     step=batch_rows, desc=f"fewshot {name}")
    meta = {"classes": list(head.classes), "kind": head.kind, "head": head.digest, "head_file": head_file,
            "rows": n, "validation": head.validation, "counts": head.counts, "temperature": head.temperature,
            "model": store.attrs.get("model"), "software_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    writer.install(meta)
    store = open_store(path, "r")
    return ApplySummary(store.path, name, n, list(head.classes), _counts(store, name, len(head.classes)),
                        time.perf_counter() - t0, resumed_from=resumed)


def _writer(store: EmbeddingStore, head: Head, name: str, n: int) -> DerivedWriter:
    """The resumable writer of head ``name``: work area ``_fewshot_partial/<name>``, installed as
    ``fewshot/<name>``; resumed when it belongs to the same head and row count."""
    return DerivedWriter(store, dest=f"{GROUP}/{name}", partial=f"{PARTIAL}/{name}",
                         arrays=probability_arrays(len(head.classes), f"calibrated probabilities of the few-shot head "
                                                                      f"{name!r}, columns in attrs fewshot.{name}.classes"),
                         signature={"head": head.digest, "rows": int(n)}, attr=ATTR, entry=name,
                         parent_description="few-shot heads applied to the store",
                         what=f"application of another head {name!r}")


def _counts(store: EmbeddingStore, name: str, k: int) -> dict[str, int]:
    meta = (store.attrs.get(ATTR) or {}).get(name) or {}
    return label_counts(store, f"{GROUP}/{name}/label", meta.get("classes", range(k)))
