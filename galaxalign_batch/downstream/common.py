"""What the downstream commands share: their errors and a store's classification.

Reading a store (``open_readable``, the embeddings view, chunking) and ``ModelMismatchError`` are
:mod:`galaxalign_batch.store`'s; positions and angles on the sky :mod:`galaxalign_batch.sky`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from galaxalign_batch.errors import GalaxAlignError
from galaxalign_batch.store import EmbeddingStore

log = logging.getLogger(__name__)

#: The store attribute that describes a finished classification (see docs/downstream.md).
CLASSIFICATION_ATTR = "classification"
#: The arrays ``classify`` writes, one row per store row.
CLASSIFICATION_ARRAYS = ("probs", "label", "confidence")


class QueryError(GalaxAlignError):
    """A search query that names nothing in the store (unknown id, empty sky region, unreadable image)."""


class CatalogError(GalaxAlignError):
    """A user catalog that cannot be read or matched (format, missing RA/Dec or key column)."""


@dataclass(frozen=True)
class Classification:
    """A finished classification of a store: class keys and labels, and who made it."""

    classes: list[str]
    labels: list[str]
    method: str
    model: dict
    rows: int

    def key_of(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[np.asarray(index, dtype=np.int64)]


def classification_of(store: EmbeddingStore, *, warn: bool = True) -> Classification | None:
    """The store's classification when ``classify`` finished one covering every committed row, else None."""
    meta = store.attrs.get(CLASSIFICATION_ATTR)
    if not meta or not all(name in store for name in CLASSIFICATION_ARRAYS):
        return None
    if int(meta.get("rows", -1)) != store.n_rows:
        if warn:
            log.warning("%s: the classification covers %s rows but the store has %d (embed added rows since): "
                        "re-run 'galaxalign-batch classify'; ignoring it", store.path, meta.get("rows"), store.n_rows)
        return None
    return Classification(list(meta["classes"]), list(meta.get("labels", meta["classes"])), str(meta["method"]),
                          dict(meta.get("model", {})), int(meta["rows"]))
