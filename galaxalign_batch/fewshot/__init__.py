"""Few-shot heads on frozen store embeddings (docs/fewshot.md).

Contract (stable; the labelling web app codes against it)::

    from galaxalign_batch.fewshot import fit_head, load_head, Head

    head = fit_head(X, y, classes=["ring", "not ring"], kind="linear", seed=0)
    #   X: (n, d) embeddings, any float dtype (store rows are unit-norm float16; cast to float32)
    #   y: (n,) int indices into classes; every class needs >= MIN_PER_CLASS (1) label, >= 2 classes
    #   kind: "linear" (L2 multinomial logistic regression) | "mlp" (one hidden layer, weight decay,
    #   early stopping with >= 40 labels); deterministic for a seed; linear < 1 s for 500 x 128 on one core
    #   optional keywords: source={...} (store / model identity kept in the file), C (linear L2), validate
    P = head.predict_proba(X)   # (n, K) float32, rows sum to 1, temperature-calibrated when n >= 20
    head.predict(X)             # (n,) int64 argmax
    head.classes                # list[str]
    head.validation             # None with < 3 labels in some class, else out-of-fold estimates:
                                # {"method": "5-fold stratified CV", "folds", "n", "accuracy",
                                #  "balanced_accuracy", "auc", "log_loss", "ece", "temperature", "calibrated"}
    head.counts                 # {class: labels}; head.kind, head.temperature, head.digest, head.source
    head.save(path)             # one safetensors file (weights + JSON metadata), written atomically
    head = load_head(path)      # ConfigError for anything that is not a head file

Errors are :class:`galaxalign_batch.errors.ConfigError` with one line. Applying a head to a whole
store: :func:`apply_head` (``fewshot/<name>/{probs,label,confidence}``); label files:
:func:`read_labels`, :func:`rows_of`, :func:`embeddings_at`.
"""

from galaxalign_batch.fewshot.heads import (CALIBRATE_MIN_LABELS, CV_MIN_PER_CLASS, KINDS, MIN_PER_CLASS, Head,
                                            expected_calibration_error, fit_head, load_head)

__all__ = ["Head", "fit_head", "load_head", "KINDS", "MIN_PER_CLASS", "CV_MIN_PER_CLASS", "CALIBRATE_MIN_LABELS",
           "expected_calibration_error", "apply_head", "fewshot_results", "read_labels", "rows_of", "embeddings_at",
           "LabelSet"]


def __getattr__(name: str):  # the store-facing parts are imported on first use
    if name in ("apply_head", "fewshot_results"):
        from galaxalign_batch.fewshot import apply

        return getattr(apply, name)
    if name in ("read_labels", "rows_of", "embeddings_at", "LabelSet"):
        from galaxalign_batch.fewshot import labels

        return getattr(labels, name)
    raise AttributeError(name)
