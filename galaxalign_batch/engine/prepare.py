"""CPU work of one tile: read it, find its sources, cut, resample and stretch them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from galaxalign_batch.survey.tiles import TileRef
from galaxalign_batch.errors import TileError
from galaxalign_batch.preprocess import CutoutSpec, make_cutouts
from galaxalign_batch.store import schema


@dataclass
class PreparedTile:
    """The rows of one tile without their embeddings, plus the model-ready pixels."""

    ref: TileRef
    columns: dict[str, np.ndarray]  # every store column except embedding (healpix/flags filled by the store)
    pixels: np.ndarray  # (N, 3, S, S), spec.dtype
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.columns["ra"])


#: the bands of the run (``embed --bands`` as chosen by survey.bands.choose_bands) and the model's bands;
#: set per task by the engine (a worker process serves tasks of several runs), like the image-size limit
_RUN_BANDS: tuple | None = None
_MODEL_BANDS: tuple | None = None


def set_bands(bands=None, model_bands=None) -> None:
    global _RUN_BANDS, _MODEL_BANDS
    _RUN_BANDS = tuple(bands) if bands else None
    _MODEL_BANDS = tuple(model_bands) if model_bands else None


def read_tile(ref: TileRef):
    from galaxalign_batch.survey import layout, open_tile, read_brick
    from galaxalign_batch.survey.bands import select_bands

    # maskbits are not used by the engine (yet): not decompressing them saves a seventh of the read
    if ref.is_brick:
        return read_brick(ref.path, ref.brick, bands=_RUN_BANDS or layout.BANDS, with_maskbits=False)
    return select_bands(open_tile(ref.path), _RUN_BANDS, _MODEL_BANDS)


def prepare_tile(ref: TileRef, spec: CutoutSpec, *, catalog: str = "auto") -> PreparedTile:
    """Read ``ref``, find its sources (Tractor catalog when present, else detection), make cutouts.

    ``catalog``: ``auto``, ``detect`` or a Tractor catalog path. Detected sources are named
    ``"{ref.name}/det{i}"`` (the tile's key, a resolved path: unique across folders and roots).
    Every source of the tile; a selection (targets, a ``--where`` cut, kept columns, section reads) is
    :func:`galaxalign_batch.engine.selection.prepare_selected`.
    Raises :class:`TileError` for anything wrong with the tile's files.
    """
    from galaxalign_batch.survey import sources_for

    t0 = time.perf_counter()
    tile = read_tile(ref)
    sources = sources_for(tile, catalog=catalog, id_prefix=ref.name)
    t1 = time.perf_counter()
    return cut_sources(ref, tile, sources, spec, t0, t1)


def cut_sources(ref: TileRef, tile, sources, spec: CutoutSpec, t0: float, t1: float,
                extra: dict[str, np.ndarray] | None = None) -> PreparedTile:
    """Cutouts and store columns of ``sources`` (object_id, ra, dec, x, y) on ``tile``; ``extra``: optional
    store columns (one value per source) added as they are."""
    n = len(sources["ra"])
    x = np.asarray(sources["x"], dtype=np.float64)
    y = np.asarray(sources["y"], dtype=np.float64)
    if n:
        batch = make_cutouts(tile.image, tile.valid, x, y, tile.pixscale, spec, bands=tile.bands, wcs=tile.wcs)
        pixels, masked = batch.pixels, np.asarray(batch.masked_fraction, dtype=np.float32)
    else:
        pixels = np.zeros((0, 3, spec.out_size, spec.out_size), dtype=spec.dtype)
        masked = np.zeros(0, np.float32)
    t2 = time.perf_counter()
    h, w = tile.image.shape[1:]
    half = 0.5 * spec.angular_size / tile.pixscale
    edge = (x - half < -0.5) | (y - half < -0.5) | (x + half > w - 0.5) | (y + half > h - 0.5)
    flags = (edge * schema.FLAG_EDGE + (masked > 0) * schema.FLAG_MASKED
             + (masked >= 0.5) * schema.FLAG_MOSTLY_MASKED).astype(np.uint16)
    if n and not np.isfinite(np.asarray(sources["ra"], dtype=np.float64)).all():
        raise TileError(ref.path, "source positions are not finite (bad WCS?)")
    columns = {
        "object_id": np.asarray(sources["object_id"]).astype(str),
        "ra": np.asarray(sources["ra"], dtype=np.float64),
        "dec": np.asarray(sources["dec"], dtype=np.float64),
        "tile": np.full(n, ref.name),
        "x": x.astype(np.float32),
        "y": y.astype(np.float32),
        "masked_fraction": masked,
        "flags": flags,
        **(extra or {}),
    }
    return PreparedTile(ref, columns, pixels, {"read": t1 - t0, "preprocess": t2 - t1})
