"""`classify`: a class for every row of a store, written into the store, resumable and never half-written.

Zero-shot methods (``text``, ``symbol``, ``combined``) score the stored embeddings against the
checkpoint's class prototypes with the fused kernel :func:`galaxalign_batch.ops.prototype_probs`
(softmax of ``logit_scale * e . p_k``), exactly :meth:`GalaxAlignModel.classify`. The ``head``
method (the image-only baseline's linear head) needs the *unnormalised* image features, which the
store does not keep: it re-makes the cutouts from the tiles and runs the model (slow; needs the tiles).

Writing: the arrays ``probs`` (N, K) float32, ``label`` (N,) int16 and ``confidence`` (N,) float32
are first written under ``_classify_partial/`` in row batches, each batch followed by an atomic
``rows_done`` attribute update, so a killed run resumes where it stopped. When every row is done
they are renamed into place and the store attribute ``classification`` is set; until then readers
see the previous classification (or none). The store's :class:`~galaxalign_batch.store.DerivedWriter`
does the writing (docs/store.md, "Derived results"); see docs/downstream.md.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from galaxalign_batch._version import __version__
from galaxalign_batch.downstream.common import CLASSIFICATION_ATTR, classification_of
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import (DerivedWriter, EmbeddingStore, ModelMismatchError, StoreError, count_lines,
                                    label_counts, open_store, probability_arrays, probability_columns)

log = logging.getLogger(__name__)

PARTIAL = "_classify_partial"
METHODS = ("auto", "combined", "text", "symbol", "head")


@dataclass
class Scorer:
    """Class probabilities for row ranges of a store, and what made them."""

    identity: dict  # the model identity; must equal the store's attrs["model"]["id"]
    method: str
    classes: list[str]
    labels: list[str]
    score: Callable[[EmbeddingStore, int, int], np.ndarray]  # (store, start, stop) -> (stop-start, K) float32
    batch_rows: int | None = None  # preferred batch size (rows); None: one shard
    extra: dict = field(default_factory=dict)  # recorded in the classification attribute
    # for a cluster: () -> (fn, args), fn(start, stop, store_path, *args) -> (stop-start, K) probabilities, a
    # module-level function (Ray ships it by name); None: this scorer runs only here
    task: Callable[[], tuple] | None = None


@dataclass
class ClassifySummary:
    store: str
    rows: int
    method: str
    classes: list[str]
    counts: dict[str, int]
    seconds: float
    resumed_from: int = 0
    up_to_date: bool = False

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"{self.store}: already classified ({self.method}, {self.rows} rows); nothing to do "
                    "(--force to redo)"]
        head = f"{self.store}: classified {self.rows} rows ({self.method}) in {self.seconds:.1f} s"
        if self.resumed_from:
            head += f" (resumed at row {self.resumed_from})"
        return [head] + count_lines(self.classes, self.counts, self.rows)


# ---------------------------------------------------------------------------------------------- scorers

def checkpoint_identity(path: str | os.PathLike) -> dict:
    """The identity ``embed --model CKPT`` records for a checkpoint (:func:`galaxalign_batch.model.spec.model_identity`),
    read without loading the weights; a file that is no checkpoint of ours is a ConfigError saying why."""
    from galaxalign_batch.model.checkpoint import read_info
    from galaxalign_batch.model.spec import ModelSpec, model_identity

    path = os.fspath(path)
    return model_identity(ModelSpec("checkpoint", path, None, path), read_info(path))


def check_model(store: EmbeddingStore, identity: dict, what: str = "--model") -> None:
    have = store.attrs.get("model") or {}
    if have.get("id") != identity.get("id"):
        raise ModelMismatchError(
            f"{store.path}: store written by another model: {have.get('name')} ({have.get('kind')}, id "
            f"{have.get('id')}), not {identity.get('name')} (id {identity.get('id')}) given as {what}")


def missing_model_error(store: EmbeddingStore) -> ConfigError:
    m = store.attrs.get("model") or {}
    return ConfigError(f"{store.path}: classify needs --model: the store was embedded with {m.get('kind', '?')} model "
                       f"{m.get('name', '?')} (id {m.get('id', '?')}); pass that checkpoint file (the store keeps no weights)")


def scorer_from_checkpoint(path: str | os.PathLike, store: EmbeddingStore, method: str = "auto", *,
                           device: str = "cpu", roots: Sequence[str] | None = None, impl: str = "auto") -> Scorer:
    """A :class:`Scorer` for ``store`` from the checkpoint it was embedded with (refuses any other)."""
    from galaxalign_batch.model.checkpoint import load_checkpoint
    from galaxalign_batch.model.evaluate import PRIMARY, methods_for

    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    identity = checkpoint_identity(path)
    check_model(store, identity)
    model = load_checkpoint(path, device=device)
    method = PRIMARY[model.mode] if method == "auto" else method
    if method not in methods_for(model):
        raise ConfigError(f"--method {method} does not apply to this {model.mode} checkpoint "
                          f"(it supports: {', '.join(methods_for(model))})")
    vocab = model.vocabulary
    if method == "head":
        return _head_scorer(model, identity, store, roots)
    scale = float(model.logit_scale.detach())
    cache: dict[str, torch.Tensor] = {}  # prototypes are made on first use: an up-to-date store needs none

    def score(st: EmbeddingStore, start: int, stop: int) -> np.ndarray:
        from galaxalign_batch import ops

        if "p" not in cache:
            cache["p"] = model.class_prototypes(method).detach()
        prototypes = cache["p"]
        feats = torch.from_numpy(np.ascontiguousarray(st.read_embeddings(slice(start, stop)))).to(prototypes.device)
        return ops.prototype_probs(feats, prototypes, scale, impl=impl).cpu().numpy()

    def task() -> tuple:
        if "p" not in cache:
            cache["p"] = model.class_prototypes(method).detach()
        return zero_shot_probs, (cache["p"].float().cpu().numpy(), scale, impl)

    return Scorer(identity, method, vocab.keys, vocab.labels, score,
                  extra={"logit_scale": scale, "vocabulary": vocab.name, "vocabulary_digest": vocab.digest()},
                  task=task)


def zero_shot_probs(start: int, stop: int, store_path: str, prototypes: np.ndarray, scale: float,
                    impl: str = "auto") -> np.ndarray:
    """Task (any node): the zero-shot probabilities of store rows [start, stop) (float32 (n, K))."""
    from galaxalign_batch import ops

    store = open_store(store_path)
    feats = torch.from_numpy(np.ascontiguousarray(store.read_embeddings(slice(start, stop))))
    return ops.prototype_probs(feats, torch.from_numpy(prototypes), scale, impl=impl).cpu().numpy()


def _head_scorer(model, identity: dict, store: EmbeddingStore, roots: Sequence[str] | None) -> Scorer:
    spec = store.cutout_spec
    opener = store.tile_opener(roots)
    log.info("method head: re-making the cutouts from the tiles (the store keeps only normalised features)")

    def score(st: EmbeddingStore, start: int, stop: int) -> np.ndarray:
        cut = st.cutouts(range(start, stop), spec, opener=opener, strict=True)
        pixels = np.stack([cut[r] for r in range(start, stop)])
        return model.classify(pixels, "head").float().cpu().numpy()

    vocab = model.vocabulary
    return Scorer(identity, "head", vocab.keys, vocab.labels, score, batch_rows=2048,
                  extra={"vocabulary": vocab.name, "vocabulary_digest": vocab.digest()})


# ---------------------------------------------------------------------------------------------- the run

def _signature(scorer: Scorer, n_rows: int) -> dict:
    return {"model_id": scorer.identity.get("id"), "method": scorer.method, "classes": list(scorer.classes),
            "rows": int(n_rows)}


def _writer(store: EmbeddingStore, scorer: Scorer, n: int) -> DerivedWriter:
    """The resumable writer of the classification: work area ``_classify_partial``, arrays installed at the
    root; resumed when it belongs to the same run (model, method, classes, rows)."""
    return DerivedWriter(store, dest="", partial=PARTIAL,
                         arrays=probability_arrays(len(scorer.classes), "class probabilities (softmax), columns in "
                                                                        "attrs classification.classes"),
                         signature=_signature(scorer, n), attr=CLASSIFICATION_ATTR,
                         what="classification (by another model/method, or of other rows)")


def classify_store(path: str | os.PathLike, scorer: Scorer, *, batch_rows: int | None = None,
                   force: bool = False, force_unlock: bool = False, address: str | None = None) -> ClassifySummary:
    """Classify every committed row of the store at ``path`` with ``scorer`` (see the module docstring).

    Holds the store's lock (one writer per store, docs/store.md) while it runs. ``address``: score the row
    batches as Ray tasks on that cluster (``auto``, host:port, or ``local``); this process, the lock holder,
    writes them in order through the store's DerivedWriter.
    """
    from galaxalign_batch.lease import locked

    with locked(path, force_unlock):
        return _classify_store(path, scorer, batch_rows=batch_rows, force=force, address=address)


def _classify_store(path: str | os.PathLike, scorer: Scorer, *, batch_rows: int | None, force: bool,
                    address: str | None = None) -> ClassifySummary:
    t0 = time.perf_counter()
    store = open_store(path, "r+")
    if not os.path.isdir(store.path):
        raise StoreError(f"{store.path}: classify writes into local stores only")
    check_model(store, scorer.identity)
    n = store.n_rows
    if n == 0:
        raise StoreError(f"{store.path}: the store has no rows yet (run 'galaxalign-batch embed' first)")
    current = classification_of(store, warn=False)
    meta = store.attrs.get(CLASSIFICATION_ATTR) or {}
    writer = _writer(store, scorer, n)
    if (not force and current is not None and current.method == scorer.method and current.classes == scorer.classes
            and (meta.get("model") or {}).get("id") == scorer.identity.get("id")):
        writer.discard()
        counts = _counts(store, current.classes)
        return ClassifySummary(store.path, n, scorer.method, current.classes, counts, time.perf_counter() - t0,
                               up_to_date=True)

    done = writer.begin()
    resumed = done
    if done:
        log.info("%s: resuming the classification at row %d of %d", store.path, done, n)

    def score(start: int, stop: int) -> dict[str, np.ndarray]:
        probs = np.asarray(scorer.score(store, start, stop), dtype=np.float32)
        if probs.shape != (stop - start, len(scorer.classes)):
            raise ConfigError(f"scorer returned shape {probs.shape}, expected ({stop - start}, {len(scorer.classes)})")
        return probability_columns(probs)

    step = batch_rows or scorer.batch_rows
    if address and scorer.task is None:
        log.warning("--address: method %s re-runs the model on re-made cutouts here, not on the cluster",
                    scorer.method)
    if address and scorer.task is not None:
        from galaxalign_batch.downstream.distributed import make_executor, ordered_batches

        fn, args = scorer.task()
        with make_executor(address) as ex:
            tasks = ordered_batches(ex, _scored_columns, writer.batches(step), store.path, len(scorer.classes), fn,
                                    *args)
            writer.write(tasks, step=step, desc=f"classify ({ex.slots} Ray CPUs)")
    else:
        writer.write(score, step=step, desc="classify")  # whole chunks, each written once

    meta = {"method": scorer.method, "classes": list(scorer.classes), "labels": list(scorer.labels),
            "model": dict(scorer.identity), "rows": n, "software_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **scorer.extra}
    writer.install(meta)
    store = open_store(path, "r")
    return ClassifySummary(store.path, n, scorer.method, list(scorer.classes), _counts(store, scorer.classes),
                           time.perf_counter() - t0, resumed_from=resumed)


def _scored_columns(start: int, stop: int, store_path: str, k: int, fn, *args) -> dict[str, np.ndarray]:
    """Task: ``probs``, ``label``, ``confidence`` of rows [start, stop) by ``fn``."""
    probs = np.asarray(fn(start, stop, store_path, *args), dtype=np.float32)
    if probs.shape != (stop - start, k):
        raise ConfigError(f"scorer returned shape {probs.shape}, expected ({stop - start}, {k})")
    return probability_columns(probs)


def _counts(store: EmbeddingStore, classes: list[str]) -> dict[str, int]:
    return label_counts(store, "label", classes)
