"""Which bands a run reads (``embed --bands``) and how a tile is cut down to them.

A model's input channels come from its :class:`~galaxalign_batch.preprocess.CutoutSpec`: each band of
``band_planes`` fills one RGB plane (viewer: z->R, r->G, g->B), so a model trained on g r z has no plane
for DR10's i band. :func:`choose_bands` keeps the bands the model has a plane for and says what it left
out; :func:`select_bands` cuts a tile read with more bands down to them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from galaxalign_batch.errors import ConfigError, TileError


def parse_bands(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"griz"``, ``"g,r,i,z"`` or ``["g", "r"]`` -> ``("g", "r", "i", "z")``; None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p for p in text.replace(",", " ").split()]
        if len(parts) == 1 and len(parts[0]) > 1 and parts[0].isalpha() and parts[0].islower():
            parts = list(parts[0])  # griz
    else:
        parts = [str(p) for p in text]
    if not parts or len(set(parts)) != len(parts):
        raise ConfigError(f"--bands {text!r}: give distinct band names, e.g. griz or g,r,z")
    return tuple(parts)


def choose_bands(spec, requested: Sequence[str] | None) -> tuple[tuple[str, ...] | None, list[str]]:
    """``(bands to read, notes)`` for ``--bands requested`` and the model's ``spec``.

    - nothing requested: None (bricks read the model's bands; cubes keep theirs, or the model's when
      they have more than three) and no note;
    - with a stretch: the requested bands the model has a plane for, in the requested order; the others
      are not read (a note says so); a model band not requested leaves its plane empty (a note);
    - stretch ``none`` (channels in band order): at most three bands, as requested.
    """
    if requested is None:
        return None, []
    requested = tuple(requested)
    if spec.stretch == "none":
        if len(requested) > 3:
            raise ConfigError(f"--bands {''.join(requested)}: the model's cutouts take at most 3 bands "
                              "(stretch 'none' puts them in band order)")
        return requested, []
    planes = dict(spec.band_planes)
    usable = tuple(b for b in requested if b in planes)
    notes = []
    if not usable:
        raise ConfigError(f"--bands {''.join(requested)}: the model has a colour plane for none of them (its "
                          f"cutouts take {', '.join(planes)}; CutoutSpec.band_planes)")
    if dropped := [b for b in requested if b not in planes]:
        notes.append(f"--bands {''.join(requested)}: the model's cutouts take bands {''.join(planes)} (its "
                     f"CutoutSpec.band_planes); band(s) {', '.join(dropped)} not read")
    if unused := [b for b in planes if b not in usable]:
        notes.append(f"--bands {''.join(requested)}: the model's band(s) {', '.join(unused)} not read; their "
                     "colour plane of every cutout stays empty")
    return usable, notes


def select_bands(tile, bands: Sequence[str] | None, model_bands: Sequence[str] | None = None):
    """``tile`` with only ``bands`` (those it has, in that order); without ``bands``, a tile of more than
    three bands keeps ``model_bands`` (the model's). :class:`TileError` when it has none of them."""
    want = tuple(bands) if bands else (tuple(model_bands) if model_bands and len(tile.bands) > 3 else None)
    if want is None or tuple(tile.bands) == want:
        return tile
    keep = [tile.bands.index(b) for b in want if b in tile.bands]
    if not keep:
        raise TileError(tile.path, f"has bands {''.join(tile.bands)}, none of {''.join(want)}")
    if len(keep) == len(tile.bands):
        return tile
    return dataclasses.replace(
        tile, bands=tuple(tile.bands[i] for i in keep), image=tile.image[keep], valid=tile.valid[keep],
        invvar=None if tile.invvar is None else tile.invvar[keep])
