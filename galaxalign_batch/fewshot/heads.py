"""Few-shot heads on frozen embeddings: a linear probe or a one-hidden-layer MLP, calibrated, saved to one file.

Fitting (:func:`fit_head`), in order:

1. **Standardise**: ``z = (x - mean) / scale`` with the labelled rows' mean and one scalar ``scale``
   (the RMS per feature of the centred rows). Store embeddings are unit-norm and share a common
   direction; centring removes it and the scalar keeps the L2 penalty meaningful whatever ``d`` is,
   without noisy per-feature variances at tiny ``n``.
2. **Cross-validate** (when every class has at least :data:`CV_MIN_PER_CLASS` labels): stratified
   ``k = min(5, smallest class count)``-fold CV of the same head gives out-of-fold logits, hence
   :attr:`Head.validation` (accuracy, balanced accuracy, AUC, log loss, ECE on held-out labels).
3. **Calibrate** (when there are also at least :data:`CALIBRATE_MIN_LABELS` labels): temperature
   scaling, one scalar ``T`` fitted on the out-of-fold logits by maximum likelihood and applied to
   the final head (the cross-validated calibration of scikit-learn's ``CalibratedClassifierCV(
   ensemble=False)``, with one parameter for any number of classes). Below that, ``T = 1``: the
   L2-regularised model's own probabilities, which at small ``n`` are pulled toward the labelled
   class frequencies (under-confident rather than over-confident).
4. **Fit** the final head on every label.

Linear: multinomial (binary: logistic) regression with an L2 penalty (scikit-learn
``LogisticRegression``, lbfgs). MLP: one hidden layer (GELU), AdamW with weight decay, full-batch;
with at least :data:`EARLY_STOP_MIN_LABELS` labels (and 4 per class) 20 % of them (stratified) pick
the number of epochs by validation loss, then the head is refitted on all labels for that many
epochs (the cross-validation folds train for the same number); below that a fixed number of epochs.
Both are deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "galaxalign-fewshot-head"
FORMAT_VERSION = 1
META_KEY = "galaxalign_fewshot"
KINDS = ("linear", "mlp")
#: Fewest labels per class :func:`fit_head` accepts.
MIN_PER_CLASS = 1
#: Fewest labels per class for a cross-validated estimate (``Head.validation``); below it, None.
CV_MIN_PER_CLASS = 3
#: Fewest labels in all for temperature scaling; below it, T = 1.
CALIBRATE_MIN_LABELS = 20
#: Fewest labels for MLP early stopping on a held-out 20 %.
EARLY_STOP_MIN_LABELS = 40
MAX_FOLDS = 5
ECE_BINS = 10

LINEAR_C = 1.0  # inverse L2 strength on the standardised features
MLP_HIDDEN = 128
MLP_LR = 1e-2
MLP_WEIGHT_DECAY = 1e-2
MLP_EPOCHS = 200  # fixed budget below EARLY_STOP_MIN_LABELS, and the cap with early stopping
MLP_PATIENCE = 25


@dataclass
class Head:
    """A fitted few-shot head: ``predict_proba(X)`` on embeddings -> calibrated (n, K) probabilities."""

    classes: list[str]
    kind: str
    tensors: dict[str, np.ndarray]  # mean (d,), scale (1,), and the layer weights
    temperature: float = 1.0
    validation: dict | None = None
    counts: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # seed and hyperparameters
    source: dict = field(default_factory=dict)  # where the embeddings came from: store, model identity, dim
    created: str = ""

    @property
    def dim(self) -> int:
        return int(self.tensors["mean"].shape[0])

    @property
    def n_labels(self) -> int:
        return int(sum(self.counts.values()))

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Uncalibrated (n, K) float64 logits (softmax of ``logits / temperature`` are the probabilities)."""
        Z = _standardise(_as_features(X, self.dim), self.tensors)
        return _forward(self.kind, self.tensors, Z)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, (n, K) float32, rows summing to 1."""
        return _softmax(self.logits(X) / self.temperature).astype(np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the most probable class, (n,) int64."""
        return self.logits(X).argmax(1)

    def describe(self) -> dict:
        """Everything but the weights, as JSON-able metadata (what :meth:`save` writes beside them)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "classes": list(self.classes),
                "dim": self.dim, "temperature": float(self.temperature), "validation": self.validation,
                "counts": dict(self.counts), "settings": dict(self.settings), "source": dict(self.source),
                "created": self.created, "software_version": __version__, "digest": self.digest}

    @property
    def digest(self) -> str:
        """Hash of the weights, classes and temperature: identifies what the head computes."""
        h = hashlib.sha256(json.dumps([self.kind, list(self.classes), float(self.temperature)]).encode())
        for k in sorted(self.tensors):
            t = np.ascontiguousarray(self.tensors[k], dtype=np.float32)
            h.update(k.encode() + str(t.shape).encode() + t.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (weights + JSON metadata) atomically; returns the path."""
        from galaxalign_batch.model.files import write_weights

        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()}
        return write_weights(path, tensors, META_KEY, self.describe())


def read_head_info(path: str | os.PathLike) -> dict:
    """The description of a head file (:meth:`Head.describe`), no weights read."""
    from galaxalign_batch.model.files import read_description

    return read_description(path, META_KEY, FORMAT, FORMAT_VERSION, "head")


def load_head(path: str | os.PathLike) -> Head:
    """A :class:`Head` from a file written by :meth:`Head.save`."""
    from galaxalign_batch.model.files import read_weights

    info = read_head_info(path)
    tensors = read_weights(path, framework="numpy")
    if info.get("kind") not in KINDS or not {"mean", "scale"} <= set(tensors):
        raise ConfigError(f"{path}: incomplete head (kind {info.get('kind')!r}, tensors {sorted(tensors)})")
    return Head(list(info["classes"]), info["kind"], tensors, float(info.get("temperature", 1.0)),
                info.get("validation"), dict(info.get("counts", {})), dict(info.get("settings", {})),
                dict(info.get("source", {})), str(info.get("created", "")))


# ---------------------------------------------------------------------------------------------- fitting

def fit_head(X: np.ndarray, y: Sequence[int], classes: Sequence[str], kind: str = "linear", seed: int = 0, *,
             source: dict | None = None, C: float = LINEAR_C, validate: bool = True) -> Head:
    """Fit a calibrated few-shot head (see the module docstring).

    ``X``: (n, d) embeddings (any float dtype; cast to float32); ``y``: (n,) indices into ``classes``;
    every class needs at least :data:`MIN_PER_CLASS` label(s). ``source`` (store path, model
    identity) is kept in the saved file. ``validate=False`` skips cross-validation and calibration.
    """
    classes = [str(c) for c in classes]
    X, y = _check_inputs(X, y, classes, kind)
    with one_thread(torch_too=kind == "mlp"):
        return _fit_head(X, y, classes, kind, seed, source, C, validate)


def _fit_head(X, y, classes, kind, seed, source, C, validate) -> Head:
    k = len(classes)
    counts = np.bincount(y, minlength=k)
    stats = _standardiser(X)
    Z = _standardise(X, stats)
    if kind == "linear":
        hyper = {"C": float(C)}
        settings = {"seed": int(seed), "C": float(C)}
    else:
        epochs, early = _mlp_epochs(Z, y, k, seed)
        hyper = {"epochs": epochs}
        settings = {"seed": int(seed), "hidden": MLP_HIDDEN, "lr": MLP_LR, "weight_decay": MLP_WEIGHT_DECAY,
                    "epochs": epochs, "early_stopping": early}
    temperature, validation = 1.0, None
    min_count = int(counts.min())
    if validate and min_count >= CV_MIN_PER_CLASS:
        folds = min(MAX_FOLDS, min_count)
        oof = _out_of_fold_logits(kind, Z, y, k, folds, seed, hyper)
        calibrated = len(y) >= CALIBRATE_MIN_LABELS
        if calibrated:
            temperature = fit_temperature(oof, y)
        validation = _metrics(_softmax(oof / temperature), y, k)
        validation.update(method=f"{folds}-fold stratified CV", folds=folds, temperature=float(temperature),
                          calibrated=calibrated)
    weights = _fit(kind, Z, y, k, seed, hyper)
    return Head(classes, kind, {**stats, **weights}, float(temperature), validation,
                {c: int(n) for c, n in zip(classes, counts)}, settings, dict(source or {}),
                _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


@contextlib.contextmanager
def one_thread(torch_too: bool = True):
    """BLAS/OpenMP (and torch) on one thread: small fits are fastest so, and a busy machine does not slow them 10x."""
    from threadpoolctl import threadpool_limits

    torch = None
    if torch_too or "torch" in sys.modules:
        import torch
    n = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(n)


def _check_inputs(X, y, classes: list[str], kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in KINDS:
        raise ConfigError(f"head kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if len(classes) < 2:
        raise ConfigError(f"a head needs at least 2 classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"class names must be unique, got {classes}")
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ConfigError(f"embeddings must be a non-empty (n, d) array, got shape {X.shape}")
    X = X.astype(np.float32)
    if not np.isfinite(X).all():
        raise ConfigError(f"embeddings hold {int((~np.isfinite(X)).any(1).sum())} row(s) with NaN or inf")
    y = np.asarray(y)
    if y.shape != (len(X),) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(f"labels must be (n,) = ({len(X)},) integer class indices, got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= len(classes):
        raise ConfigError(f"label indices must lie in 0..{len(classes) - 1}, got {y.min()}..{y.max()}")
    counts = np.bincount(y, minlength=len(classes))
    few = [f"{c!r} ({n})" for c, n in zip(classes, counts) if n < MIN_PER_CLASS]
    if few:
        raise ConfigError(f"class(es) {', '.join(few)} have fewer than {MIN_PER_CLASS} labelled example(s)")
    return X, y


def _standardiser(X: np.ndarray) -> dict[str, np.ndarray]:
    mean = X.astype(np.float64).mean(0)
    rms = float(np.sqrt(np.mean((X - mean) ** 2)))
    return {"mean": mean.astype(np.float32), "scale": np.array([rms if rms > 1e-12 else 1.0], np.float32)}


def _standardise(X: np.ndarray, t: dict[str, np.ndarray]) -> np.ndarray:
    return (X - t["mean"]) / t["scale"][0]


def _as_features(X: np.ndarray, dim: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != dim:
        raise ConfigError(f"the head takes (n, {dim}) embeddings, got shape {X.shape}")
    return X.astype(np.float32)


def _fit(kind: str, Z: np.ndarray, y: np.ndarray, k: int, seed: int, hyper: dict) -> dict[str, np.ndarray]:
    if kind == "linear":
        return _fit_linear(Z, y, k, seed, hyper["C"])
    return _train_mlp(Z, y, k, seed, hyper["epochs"])[0]


def _forward(kind: str, t: dict[str, np.ndarray], Z: np.ndarray) -> np.ndarray:
    """Logits (n, K) float64; the matrix products in float32 (memory: a shard of rows at a time)."""
    Z = np.asarray(Z, np.float32)
    if kind == "linear":
        return (Z @ t["coef"].T + t["intercept"]).astype(np.float64)
    h = _gelu(Z @ t["w1"].T + t["b1"])
    return (h @ t["w2"].T + t["b2"]).astype(np.float64)


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return (0.5 * x * (1.0 + erf(x / np.float32(np.sqrt(2.0))))).astype(np.float32)


def _fit_linear(Z: np.ndarray, y: np.ndarray, k: int, seed: int, C: float) -> dict[str, np.ndarray]:
    """L2 logistic regression; binary coefficients are expanded to two logits ``[0, z]`` (same softmax)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=500, tol=1e-5, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(Z, y)
    coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
    if k == 2:
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    return {"coef": coef, "intercept": intercept}


def _mlp_epochs(Z: np.ndarray, y: np.ndarray, k: int, seed: int) -> tuple[int, bool]:
    """Epochs of the MLP: early stopping on a stratified 20 % when there are enough labels, else the fixed budget."""
    counts = np.bincount(y, minlength=k)
    if len(y) < EARLY_STOP_MIN_LABELS or counts.min() < 4:
        return MLP_EPOCHS, False
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    _, history = _train_mlp(Z[tr], y[tr], k, seed, MLP_EPOCHS, (Z[va], y[va]))
    return int(np.argmin(history)) + 1, True


def _train_mlp(Z, y, k: int, seed: int, epochs: int, val=None) -> tuple[dict, list[float]]:
    """Full-batch AdamW; with ``val``, stops ``MLP_PATIENCE`` epochs after the best validation loss."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(int(seed))
    d = Z.shape[1]
    w1 = torch.empty(MLP_HIDDEN, d).uniform_(-1, 1, generator=gen).mul_(d ** -0.5).requires_grad_()
    b1 = torch.zeros(MLP_HIDDEN, requires_grad=True)
    w2 = torch.empty(k, MLP_HIDDEN).uniform_(-1, 1, generator=gen).mul_(MLP_HIDDEN ** -0.5).requires_grad_()
    b2 = torch.zeros(k, requires_grad=True)
    params = [w1, b1, w2, b2]
    opt = torch.optim.AdamW([{"params": [w1, w2], "weight_decay": MLP_WEIGHT_DECAY},
                             {"params": [b1, b2], "weight_decay": 0.0}], lr=MLP_LR)
    x, t = torch.from_numpy(np.ascontiguousarray(Z, np.float32)), torch.from_numpy(y)
    xv, tv = (torch.from_numpy(np.ascontiguousarray(val[0], np.float32)), torch.from_numpy(val[1])) if val else (None, None)

    def forward(inp):
        return F.gelu(inp @ w1.T + b1) @ w2.T + b2

    history: list[float] = []
    for epoch in range(epochs):
        opt.zero_grad()
        F.cross_entropy(forward(x), t).backward()
        opt.step()
        if val is not None:
            with torch.no_grad():
                loss = float(F.cross_entropy(forward(xv), tv))
            history.append(loss)
            if epoch - int(np.argmin(history)) >= MLP_PATIENCE:
                break
    names = ("w1", "b1", "w2", "b2")
    return {n: p.detach().numpy().astype(np.float32) for n, p in zip(names, params)}, history


# ---------------------------------------------------------------------------------------------- validation

def _out_of_fold_logits(kind: str, Z: np.ndarray, y: np.ndarray, k: int, folds: int, seed: int,
                        hyper: dict) -> np.ndarray:
    """Logits of every label from the head fitted on the other folds (the MLP with the final head's epochs)."""
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros((len(y), k))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Z, y):
        # a fold re-standardises from its own training rows, as the final head does from all labels
        stats = _standardiser(Z[tr])
        weights = _fit(kind, _standardise(Z[tr], stats), y[tr], k, seed, hyper)
        oof[te] = _forward(kind, weights, _standardise(Z[te], stats))
    return oof


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, np.float64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin share."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def auc_score(probs: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC: of the second class for two classes, else macro one-vs-rest; None when a class is absent."""
    from sklearn.metrics import roc_auc_score

    k = probs.shape[1]
    if len(np.unique(y)) < k:
        return None
    if k == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=np.arange(k)))


def _metrics(probs: np.ndarray, y: np.ndarray, k: int) -> dict:
    from sklearn.metrics import balanced_accuracy_score, log_loss

    pred = probs.argmax(1)
    return {"n": int(len(y)), "accuracy": float(np.mean(pred == y)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "auc": auc_score(probs, y),
            "log_loss": float(log_loss(y, np.clip(probs, 1e-12, 1), labels=np.arange(k))),
            "ece": expected_calibration_error(probs, y)}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
