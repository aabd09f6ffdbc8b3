"""`morphology --regress`: regression heads fitted on a measured table, applied to every row of a store.

The heads are :mod:`galaxalign_batch.morphology.regress`'s (one scikit-learn regressor per target on
the frozen store embeddings; log10 for radii and the Sersic index). This module

1. reads a morphology table (``morphology --out``: statmorph per source, keyed by ``object_id``; or
   any table with ``object_id`` and the target columns, e.g. truth), finds its sources' embeddings
   in the store, and scores the heads by K-fold cross-validation (every value predicted by a head
   that never saw that source);
2. fits the heads on every usable row and predicts every committed row of the store;
3. writes one float32 column per target into the store, ``morphology/<target>`` (NaN where a
   prediction is not finite), through the store's resumable :class:`~galaxalign_batch.store.DerivedWriter`
   (work area ``_morphology_partial``; installed as the group ``morphology``), and the attribute
   ``morphology_regression`` = ``{targets, method, table, table_sha256, rows_used, cv, model, rows, ...}``.

Targets (``DEFAULT_TARGETS``): the Sersic index ``sersic_n``, the circularised Sersic half-light
radius ``sersic_rhalf_circ`` (arcsec) and the axis ratio ``axis_ratio`` = 1 - ``sersic_ellip``
(derived when the table has ``sersic_ellip``); any numeric column of the table can be named.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import DerivedArray, DerivedWriter, StoreError, open_store

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("sersic_n", "sersic_rhalf_circ", "axis_ratio")
GROUP = "morphology"
PARTIAL = "_morphology_partial"
ATTR = "morphology_regression"
UNITS = {"sersic_n": "", "sersic_rhalf_circ": "arcsec", "sersic_rhalf": "arcsec", "rhalf_circ": "arcsec",
         "rhalf_ellip": "arcsec", "rpetro_circ": "arcsec", "axis_ratio": "b/a"}


@dataclass
class RegressSummary:
    store: str
    rows: int
    targets: list[str]
    method: str
    rows_used: dict[str, int]
    cv_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    up_to_date: bool = False

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"{self.store}: morphology columns {', '.join(self.targets)} are up to date ({self.rows} rows); "
                    "nothing to do (--force to redo)"]
        out = list(self.cv_lines)
        head = (f"{self.store}: wrote {', '.join(f'{GROUP}/{t}' for t in self.targets)} for {self.rows} rows "
                f"({self.method} heads fitted on {', '.join(f'{t} {n}' for t, n in self.rows_used.items())} sources) "
                f"in {self.seconds:.1f} s")
        if self.resumed_from:
            head += f" (resumed at row {self.resumed_from})"
        return out + [head]


def with_derived(table):
    """The table with ``axis_ratio`` = 1 - ``sersic_ellip`` added when it can be (astropy Table, copied)."""
    t = table.copy(copy_data=False)
    if "axis_ratio" not in t.colnames and "sersic_ellip" in t.colnames:
        t["axis_ratio"] = 1.0 - np.asarray(t["sersic_ellip"], np.float64)
    return t


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def regress_store(store_path: str | os.PathLike, table_path: str | os.PathLike, *,
                  targets: Sequence[str] = DEFAULT_TARGETS, method: str = "ridge", folds: int = 5, seed: int = 0,
                  batch_rows: int | None = None, force: bool = False, force_unlock: bool = False) -> RegressSummary:
    """Fit heads on ``table_path``'s sources and write their predictions for every row into the store.

    Holds the store's lock (one writer per store). Raises ConfigError for a table without the
    targets, with too few usable rows (20 per target), or with no source in the store.
    """
    from galaxalign_batch.morphology.catalog import read_table
    from galaxalign_batch.morphology.regress import METHODS, cross_validate, fit_head, store_embeddings
    from galaxalign_batch.lease import locked

    t0 = time.perf_counter()
    targets = [str(t) for t in targets]
    if not targets or len(set(targets)) != len(targets):
        raise ConfigError(f"--targets must name distinct columns, got {targets}")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    table_path = os.fspath(table_path)
    table = with_derived(read_table(table_path))
    missing = [t for t in targets if t not in table.colnames]
    if missing:
        raise ConfigError(f"{table_path}: no column(s) {', '.join(missing)} (has: {', '.join(table.colnames)})"
                          + ("; axis_ratio is derived from sersic_ellip" if "axis_ratio" in missing else ""))
    digest = _sha256(table_path)
    with locked(store_path, force_unlock):
        store = open_store(store_path, "r+")
        if not os.path.isdir(store.path):
            raise StoreError(f"{store.path}: morphology --regress writes into local stores only")
        n = store.n_rows
        if n == 0:
            raise StoreError(f"{store.path}: the store has no rows yet (run 'galaxalign-batch embed' first)")
        signature = {"table_sha256": digest, "targets": targets, "method": method, "seed": int(seed),
                     "model_id": (store.attrs.get("model") or {}).get("id"), "rows": int(n)}
        writer = DerivedWriter(store, dest=GROUP, partial=PARTIAL,
                               arrays=[DerivedArray(t, "float32", float("nan"),
                                                    f"{t} predicted from the embedding by a {method} head"
                                                    + (f" ({UNITS[t]})" if UNITS.get(t) else ""))
                                       for t in targets],
                               signature=signature, attr=ATTR, what="morphology regression (of another table, "
                                                                     "targets or method)")
        current = store.attrs.get(ATTR) or {}
        if (not force and current.get("signature") == signature
                and all(f"{GROUP}/{t}" in store for t in targets)):
            writer.discard()
            return RegressSummary(store.path, n, targets, method, dict(current.get("rows_used") or {}),
                                  seconds=time.perf_counter() - t0, up_to_date=True)
        x, found = store_embeddings(store, table["object_id"])
        if not found.any():
            raise ConfigError(f"{table_path}: none of its {len(table)} object ids is in the store {store.path} "
                              "(a table measured on another store?)")
        if not found.all():
            log.warning("%s: %d of %d sources are not in the store; left out", table_path, int((~found).sum()),
                        len(table))
        sub = table[found]
        xs = x[found]
        cv = cross_validate(xs, sub, targets, method=method, folds=folds, seed=seed)
        head = fit_head(xs, sub, targets, method=method, seed=seed)
        from galaxalign_batch.morphology.regress import usable

        rows_used = {t: int(usable(sub, t).sum()) for t in targets}
        done = writer.begin()
        if done:
            log.info("%s: resuming the morphology columns at row %d of %d", store.path, done, n)

        def compute(start: int, stop: int) -> dict[str, np.ndarray]:
            pred = head.predict(np.asarray(store.read_embeddings(slice(start, stop)), np.float32))
            return {t: np.where(np.isfinite(v := np.asarray(pred[t], np.float64)), v, np.nan).astype(np.float32)
                    for t in targets}

        writer.write(compute, step=batch_rows, desc="morphology heads")
        scores = {str(r["target"]): {"n": int(r["n"]), "r2": float(r["r2"]), "rms": float(r["rms"]),
                                     "nmad": float(r["nmad"]), "space": str(r["space"])} for r in cv.scores}
        writer.install({"signature": signature, "targets": targets, "method": method, "folds": folds,
                        "table": os.path.abspath(table_path), "table_sha256": digest, "rows_used": rows_used,
                        "cv": scores, "rows": int(n), "model": store.attrs.get("model"),
                        "units": {t: UNITS.get(t, "") for t in targets}, "software_version": __version__,
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return RegressSummary(store.path, n, targets, method, rows_used, cv.lines(), time.perf_counter() - t0,
                          resumed_from=done)


def regression_columns(store) -> dict[str, np.ndarray] | None:
    """The store's ``morphology/<target>`` columns when ``morphology --regress`` covers every committed row."""
    meta = store.attrs.get(ATTR) or {}
    if not meta or int(meta.get("rows", -1)) != store.n_rows:
        return None
    return {t: np.asarray(store.read(f"{GROUP}/{t}")) for t in meta.get("targets", []) if f"{GROUP}/{t}" in store}
