"""Regression heads from store embeddings to morphological parameters, with honest held-out scores.

One scikit-learn model per target on the frozen embeddings: ``ridge`` (standardised features,
``RidgeCV`` over alphas 1e-3..1e4 chosen by internal leave-one-out) or ``mlp`` (one hidden layer of
64 ReLU units, L2 1.0, Adam with early stopping on 20 % of its training rows; inputs and target
standardised). Positive, skewed
quantities (radii, Sersic index) are fitted as log10. Scores come from K-fold cross-validation:
every source is predicted by a model that never saw it, and R^2, the RMS and the NMAD of the
residual are computed on those out-of-fold predictions (in the fitted space: dex for log targets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ", "sersic_n",
                   "sersic_rhalf_circ")
LOG_TARGETS = frozenset({"rpetro_circ", "rhalf_circ", "rhalf_ellip", "sersic_rhalf", "sersic_rhalf_circ", "sersic_n",
                         "true_sersic", "true_r_half"})
SERSIC_TARGETS = frozenset({"sersic_n", "sersic_rhalf", "sersic_ellip", "sersic_rhalf_circ", "axis_ratio"})
METHODS = ("ridge", "mlp")
MLP_ALPHA = 1.0


def _one_blas_thread():
    """BLAS limited to one thread: the matrices are small, and threaded OpenBLAS on a busy machine was
    ~15x slower for the MLP (measured: 48 s vs 2.8 s for one fit on 150 x 128)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def make_model(method: str, seed: int = 0):
    """A fresh scikit-learn regressor of ``method`` (see the module docstring)."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if method == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    if method == "mlp":
        # small data (hundreds of rows): early stopping on an inner validation split, standardised target
        mlp = MLPRegressor(hidden_layer_sizes=(64,), alpha=MLP_ALPHA, learning_rate_init=1e-3, early_stopping=True,
                           validation_fraction=0.2, n_iter_no_change=20, max_iter=1000, random_state=seed)
        return TransformedTargetRegressor(make_pipeline(StandardScaler(), mlp), transformer=StandardScaler())
    raise ConfigError(f"unknown regression method {method!r} (use one of {', '.join(METHODS)})")


def to_fit_space(name: str, values) -> np.ndarray:
    """Values as the head fits them: log10 for :data:`LOG_TARGETS` (NaN where not positive)."""
    v = np.asarray(values, np.float64)
    if name in LOG_TARGETS:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
    return v


def from_fit_space(name: str, values) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return 10.0 ** v if name in LOG_TARGETS else v


def usable(table: Table, name: str, max_flag: int = 0) -> np.ndarray:
    """Rows whose ``name`` can train a head: finite (positive for log targets), statmorph ``flag`` <=
    ``max_flag`` and, for Sersic parameters, ``flag_sersic`` == 0 (columns absent: not checked)."""
    if name not in table.colnames:
        raise ConfigError(f"no column {name!r} in the table (has: {', '.join(table.colnames)})")
    ok = np.isfinite(to_fit_space(name, table[name]))
    if "flag" in table.colnames:
        ok &= np.asarray(table["flag"]) <= max_flag
    if name in SERSIC_TARGETS and "flag_sersic" in table.colnames:
        ok &= np.asarray(table["flag_sersic"]) == 0
    return ok


def store_embeddings(store, object_ids) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings float32 (n, D), found bool (n,))`` of ``object_ids`` in the store (rows not found are 0)."""
    ids = np.asarray(object_ids).astype(object).astype(str)
    stored = np.asarray(store.read("object_id")).astype(object).astype(str)
    row_of = {k: i for i, k in enumerate(stored)}
    rows = np.array([row_of.get(k, -1) for k in ids], np.int64)
    found = rows >= 0
    x = np.zeros((len(ids), store.dim), np.float32)
    if found.any():
        order = np.argsort(rows[found])
        sel = rows[found][order]
        emb = store.read("embedding", sel).astype(np.float32)
        tmp = np.empty_like(emb)
        tmp[order] = emb
        x[found] = tmp
    return x, found


@dataclass
class CVResult:
    """Out-of-fold predictions and scores of one method on several targets."""

    method: str
    folds: int
    scores: Table                       # target, n, r2, rms, nmad, space
    predictions: dict = field(default_factory=dict)  # target -> (n_rows,) out-of-fold, natural units, NaN untrained

    def lines(self) -> list[str]:
        t = self.scores.copy()
        for c in ("r2", "rms", "nmad"):
            t[c].format = "{:.3f}"
        return [f"{self.method}: {self.folds}-fold cross-validated (every value predicted by a model that never "
                "saw that source)"] + t.pformat(max_lines=-1, max_width=-1)


def r2_score(y, pred) -> float:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    ss = np.sum((y - y.mean()) ** 2)
    return float(1.0 - np.sum((y - pred) ** 2) / ss) if ss > 0 else float("nan")


def nmad(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else float("nan")


def cross_validate(x: np.ndarray, table: Table, targets=DEFAULT_TARGETS, *, method: str = "ridge", folds: int = 5,
                   seed: int = 0, max_flag: int = 0, rows: np.ndarray | None = None, min_rows: int = 20) -> CVResult:
    """K-fold out-of-fold predictions of ``targets`` (columns of ``table``) from embeddings ``x`` (row-aligned).

    ``rows``: boolean mask of the rows allowed to take part (e.g. galaxies only).
    """
    from sklearn.model_selection import KFold, cross_val_predict

    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) != len(table):
        raise ConfigError(f"embeddings must be (rows of the table, D); got {x.shape} for {len(table)} rows")
    allowed = np.ones(len(table), bool) if rows is None else np.asarray(rows, bool)
    names, ns, r2s, rmss, nmads, spaces, preds = [], [], [], [], [], [], {}
    for name in targets:
        ok = allowed & usable(table, name, max_flag)
        pred = np.full(len(table), np.nan)
        n = int(ok.sum())
        names.append(name), ns.append(n), spaces.append("log10" if name in LOG_TARGETS else "linear")
        if n < max(min_rows, folds):
            log.warning("%s: only %d usable rows; not fitted", name, n)
            r2s.append(np.nan), rmss.append(np.nan), nmads.append(np.nan)
            preds[name] = pred
            continue
        y = to_fit_space(name, table[name])[ok]
        cv = KFold(folds, shuffle=True, random_state=seed)
        with _one_blas_thread():
            p = cross_val_predict(make_model(method, seed), x[ok], y, cv=cv)
        r2s.append(r2_score(y, p)), rmss.append(float(np.sqrt(np.mean((p - y) ** 2)))), nmads.append(nmad(p - y))
        pred[ok] = from_fit_space(name, p)
        preds[name] = pred
    scores = Table({"target": names, "n": np.array(ns, np.int64), "r2": r2s, "rms": rmss, "nmad": nmads,
                    "space": spaces})
    return CVResult(method, folds, scores, preds)


@dataclass
class MorphologyHead:
    """Fitted regressors (one per target) from embeddings to morphological parameters."""

    method: str
    models: dict
    embedding_dim: int

    def predict(self, x: np.ndarray) -> Table:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.embedding_dim:
            raise ConfigError(f"embeddings of dimension {x.shape[-1]}, the head expects {self.embedding_dim}")
        with _one_blas_thread():
            return Table({name: from_fit_space(name, m.predict(x)) for name, m in self.models.items()})


def fit_head(x: np.ndarray, table: Table, targets=DEFAULT_TARGETS, *, method: str = "ridge", seed: int = 0,
             max_flag: int = 0, rows: np.ndarray | None = None, min_rows: int = 20) -> MorphologyHead:
    """Fit one regressor per target on all usable rows (score it with :func:`cross_validate`)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) != len(table):
        raise ConfigError(f"embeddings must be (rows of the table, D); got {x.shape} for {len(table)} rows")
    allowed = np.ones(len(table), bool) if rows is None else np.asarray(rows, bool)
    models = {}
    for name in targets:
        ok = allowed & usable(table, name, max_flag)
        if ok.sum() < min_rows:
            raise ConfigError(f"{name}: only {int(ok.sum())} usable rows (need {min_rows}) to fit a head")
        with _one_blas_thread():
            models[name] = make_model(method, seed).fit(x[ok], to_fit_space(name, table[name])[ok])
    return MorphologyHead(method, models, x.shape[1])


def predict_store(head: MorphologyHead, store, batch_rows: int = 65536) -> Table:
    """The head's predictions for every committed row of ``store`` (``object_id`` + one column per target)."""
    emb = store.embeddings
    parts = []
    for start in range(0, store.n_rows, batch_rows):
        parts.append(head.predict(np.asarray(emb[start:start + batch_rows], np.float32)))
    from astropy.table import vstack

    out = vstack(parts) if parts else Table()
    out.add_column(np.asarray(store.read("object_id")).astype(object).astype(str), name="object_id", index=0)
    return out
