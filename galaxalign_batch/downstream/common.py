"""What the downstream commands share: their errors, a store's classification, angles on the sky.

Reading a store (``open_readable``, the embeddings view, chunking) and ``ModelMismatchError`` are
:mod:`galaxalign_batch.store`'s.
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


def parse_angle_arcsec(text: str | float, what: str = "radius") -> float:
    """An angle such as ``1arcsec``, ``0.5 arcmin``, ``2e-4 deg`` or a bare number (arcsec) -> arcsec."""
    import astropy.units as u

    from galaxalign_batch.errors import ConfigError

    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s)
        except ValueError:
            try:
                q = u.Quantity(s)
                value = float(q.to_value(u.arcsec))
            except (TypeError, ValueError, u.UnitsError):
                raise ConfigError(f"{what} {text!r}: expected an angle such as 1arcsec, 0.5arcmin or 0.001deg") from None
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive angle, got {text!r}")
    return value


def radec_to_xyz(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (N, 3) of ICRS positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def chord_from_arcsec(arcsec: float | np.ndarray) -> np.ndarray | float:
    return 2.0 * np.sin(np.radians(np.asarray(arcsec, dtype=np.float64) / 3600.0) / 2.0)


def arcsec_from_chord(chord: np.ndarray | float) -> np.ndarray | float:
    return np.degrees(2.0 * np.arcsin(np.clip(np.asarray(chord, dtype=np.float64) / 2.0, 0.0, 1.0))) * 3600.0
