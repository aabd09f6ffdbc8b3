"""Re-making cutouts of store rows from their recorded tiles (search grids, report thumbnails, labelling, head classification).

The store keeps no pixels. A row's ``tile`` is its tile's key (docs/store.md): the resolved path of
a cutout-cube file (opened directly), or a brick's resolved coadd folder ``ROOT/coadd/AAA/BRICK``
(opened from that root; when the folder is gone, e.g. the data moved, the brick is looked for by
name). Stores of format 1 hold bare brick names. Bricks are looked up by name in the survey roots:
those given (``--survey ROOT``), those the store lists in its ``survey_roots`` attribute when
present, and the default simulated survey ``runs/sky`` when it exists. Cutouts use the store's ``cutout_spec`` and
the stored pixel positions ``x``, ``y``, so they are the cutouts the model saw.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from galaxalign_batch.errors import GalaxAlignError, TileError
from galaxalign_batch.preprocess import CutoutSpec, make_cutouts

if TYPE_CHECKING:  # pragma: no cover
    from galaxalign_batch.store.embedding_store import EmbeddingStore

__all__ = ["TileOpener", "cutouts_for_rows", "store_spec", "survey_roots", "brick_of_key", "DEFAULT_SURVEY_ROOTS"]

log = logging.getLogger(__name__)

DEFAULT_SURVEY_ROOTS = ("runs/sky",)


def survey_roots(store: EmbeddingStore, given: Sequence[str] | None = None) -> list[str]:
    """Where brick tiles are looked for, in order: ``given``, the store's ``survey_roots``, the default."""
    roots = list(given or [])
    roots += list(store.attrs.get("survey_roots") or [])
    roots += [r for r in DEFAULT_SURVEY_ROOTS if os.path.isdir(r)]
    seen, out = set(), []
    for r in roots:
        a = os.path.abspath(r)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def brick_of_key(name: str) -> tuple[str | None, str | None]:
    """``(survey root or None, brick name or None)`` of a store tile key.

    ``ROOT/coadd/AAA/BRICK`` gives both; a bare brick name (stores of format 1) or a loose brick key
    ``FOLDER/BRICK`` gives the brick only; a cube path gives neither.
    """
    import re
    from pathlib import Path

    base = os.path.basename(str(name))
    if not re.fullmatch(r"\d{4}[pm]\d{3}", base):
        return None, None
    p = Path(str(name))
    if p.is_absolute() and p.parent.name == base[:3] and p.parent.parent.name == "coadd":
        return str(p.parents[2]), base
    return None, base


def store_spec(store: EmbeddingStore) -> CutoutSpec:
    spec = store.attrs.get("cutout_spec")
    return CutoutSpec.from_dict(spec) if spec else CutoutSpec()


class TileOpener:
    """Opens the tile of a store row by its ``tile`` value, remembering the last few (tiles are large)."""

    def __init__(self, roots: Sequence[str], keep: int = 2):
        self.roots = list(roots)
        self.keep = keep
        self._cache: OrderedDict[str, object] = OrderedDict()

    def locate(self, name: str) -> tuple[str, str | None]:
        """(path, brick) to open ``name`` with :func:`galaxalign_batch.survey.open_tile`."""
        import glob
        import re
        from pathlib import Path

        from galaxalign_batch.survey import layout

        brick = name
        base = os.path.basename(name)
        if os.path.isabs(name) and re.fullmatch(r"\d{4}[pm]\d{3}", base) and not os.path.isfile(name):
            p = Path(name)  # a brick key: ROOT/coadd/AAA/BRICK, or FOLDER/BRICK for loose brick files
            if p.is_dir() and p.parent.name == base[:3] and p.parent.parent.name == "coadd":
                return str(p.parents[2]), base
            loose = sorted(glob.glob(os.path.join(glob.escape(str(p.parent)), f"legacysurvey-{base}-image-*.fits*")))
            if loose:
                return loose[0], None
            brick = base  # moved: look for the brick by name in the roots
        elif os.path.isabs(name) or os.path.isfile(name):
            if not os.path.isfile(name):
                raise TileError(name, "tile file no longer exists")
            return name, None
        for root in self.roots:
            if layout.coadd_dir(root, brick).is_dir():
                return root, brick
        where = ", ".join(self.roots) if self.roots else "none given"
        raise TileError(name, f"brick not found in the survey roots ({where}); pass --survey ROOT")

    def open(self, name: str):
        from galaxalign_batch.survey import open_tile

        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        path, brick = self.locate(name)
        tile = open_tile(path, brick)
        self._cache[name] = tile
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return tile


def cutouts_for_rows(store: EmbeddingStore, rows: Iterable[int], spec: CutoutSpec | None = None, *,
                     roots: Sequence[str] | None = None, opener: TileOpener | None = None,
                     strict: bool = False) -> dict[int, np.ndarray | None]:
    """Cutouts ``(3, S, S)`` of store ``rows`` re-made from their tiles; None where a tile cannot be read.

    With ``strict`` a missing or unreadable tile raises its :class:`TileError` instead.
    """
    rows = np.unique(np.asarray(list(rows), dtype=np.int64))
    spec = spec or store_spec(store)
    opener = opener or TileOpener(survey_roots(store, roots))
    out: dict[int, np.ndarray | None] = {}
    if not len(rows):
        return out
    tiles = store.read("tile", rows)
    xs, ys = store.read("x", rows).astype(np.float64), store.read("y", rows).astype(np.float64)
    for name in dict.fromkeys(tiles):  # first-seen order
        sel = np.flatnonzero(tiles == name)
        try:
            tile = opener.open(str(name))
        except GalaxAlignError as e:
            if strict:
                raise
            log.warning("no cutouts for %d row(s): %s", len(sel), e)
            out.update({int(rows[i]): None for i in sel})
            continue
        batch = make_cutouts(tile.image, tile.valid, xs[sel], ys[sel], tile.pixscale, spec, bands=tile.bands,
                             wcs=tile.wcs)
        for j, i in enumerate(sel):
            out[int(rows[i])] = batch.pixels[j]
    return out
