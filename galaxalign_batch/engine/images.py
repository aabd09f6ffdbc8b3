"""RGB image sets in the engine: pictures (one-source tiles) travel in groups, one Ray task per group.

A task per picture would cost more in scheduling than the picture in work; so the driver packs the
pictures still to do into :class:`ImageGroup` s of ``IMAGES_PER_TASK``, a task reads and cuts a group
(:func:`prepare_images`, corrupt pictures listed with their reason), the model embeds the group's good
pictures in one call, and :func:`split_group` turns the result back into one store record per picture:
the store and a resumed run still know every picture as its own tile.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from typing import TYPE_CHECKING

from galaxalign_batch.errors import TileError
from galaxalign_batch.store import schema
from galaxalign_batch.survey.images import ImageRef

if TYPE_CHECKING:  # the preprocessing (Numba) is imported by the tasks, not by a driver with nothing to do
    from galaxalign_batch.preprocess import CutoutSpec

IMAGES_PER_TASK = 64


@dataclass(frozen=True)
class ImageGroup:
    """Pictures prepared by one task. ``name``/``path`` name the group in logs (its first picture)."""

    refs: tuple[ImageRef, ...]

    brick = None

    @property
    def name(self) -> str:
        return f"{self.refs[0].name} (+{len(self.refs) - 1} pictures)" if len(self.refs) > 1 else self.refs[0].name

    @property
    def path(self) -> str:
        return self.refs[0].path

    @property
    def is_brick(self) -> bool:
        return False

    @property
    def members(self) -> list[str]:
        return [r.name for r in self.refs]


def plan(todo: list, per_task: int = IMAGES_PER_TASK) -> list:
    """``todo`` with its :class:`ImageRef` s packed into groups (in order, after the other tiles)."""
    other = [t for t in todo if not isinstance(t, ImageRef)]
    pics = [t for t in todo if isinstance(t, ImageRef)]
    return other + [ImageGroup(tuple(pics[i:i + per_task])) for i in range(0, len(pics), per_task)]


def scale_record(pixscale: float | None, angular_size: float | None) -> dict:
    """What the pictures show, as recorded in the store's ``image_scale`` attribute."""
    if pixscale is not None:
        return {"pixscale": float(pixscale)}
    if angular_size is not None:
        return {"angular_size": float(angular_size)}
    return {"assumed": "each picture shows the model's field (its longer side resized to the model input)"}


def prepare_images(group: ImageGroup, spec: CutoutSpec, scale: dict) -> tuple[dict, np.ndarray]:
    """Read and cut a group: ``(meta, pixels)``; ``meta["columns"]`` for the good pictures (their rows, in
    order), ``meta["failed"]`` {key: reason} for the others."""
    from galaxalign_batch.preprocess.rgb import picture_pixscale, rgb_cutouts
    from galaxalign_batch.survey.images import read_picture

    t0 = time.perf_counter()
    good, pictures, scales, failed = [], [], [], {}
    for ref in group.refs:
        try:
            pic = read_picture(ref.path)
        except TileError as e:
            failed[ref.name] = str(e)
            continue
        good.append(ref)
        pictures.append(pic)
        scales.append(picture_pixscale(pic.shape[:2], pixscale=ref.pixscale if math.isfinite(ref.pixscale)
                                       else scale.get("pixscale"), angular_size=scale.get("angular_size"), spec=spec))
    t1 = time.perf_counter()
    pixels, masked = rgb_cutouts(pictures, scales, spec)
    t2 = time.perf_counter()
    n = len(good)
    ra = np.array([r.ra for r in good], np.float64)
    dec = np.array([r.dec for r in good], np.float64)
    healpix = np.full(n, -1, np.int64)
    known = np.isfinite(ra) & np.isfinite(dec)
    if known.any():
        from galaxalign_batch.store.embedding_store import _healpix

        healpix[known] = _healpix(ra[known], dec[known])
    x = np.array([(p.shape[1] - 1) / 2.0 for p in pictures], np.float32)
    y = np.array([(p.shape[0] - 1) / 2.0 for p in pictures], np.float32)
    edge = masked > 0  # the cut reaches beyond the picture
    flags = (edge * schema.FLAG_EDGE + (masked > 0) * schema.FLAG_MASKED
             + (masked >= 0.5) * schema.FLAG_MOSTLY_MASKED).astype(np.uint16)
    columns = {
        "object_id": np.array([r.object_id for r in good], dtype=str),
        "ra": ra, "dec": dec, "healpix": healpix,
        "tile": np.array([r.name for r in good], dtype=str),
        "x": x, "y": y, "masked_fraction": masked.astype(np.float32), "flags": flags,
    }
    return {"ref": group, "columns": columns, "failed": failed,
            "timings": {"read": t1 - t0, "preprocess": t2 - t1}}, pixels


def split_group(meta: dict, emb: np.ndarray | None, taken_ids: set[str]) -> list[tuple[str, dict | None, str]]:
    """One store record ``(key, rows or None, reason)`` per picture of a prepared group, in the group's order.

    A picture whose object id is in ``taken_ids`` (already in the store or taken earlier in this run) fails
    with that reason; ids it commits are added to ``taken_ids``."""
    group: ImageGroup = meta["ref"]
    cols = meta["columns"]
    row_of = {str(k): i for i, k in enumerate(cols["tile"])}
    out = []
    for ref in group.refs:
        if ref.name in meta["failed"]:
            out.append((ref.name, None, meta["failed"][ref.name]))
            continue
        i = row_of[ref.name]
        if ref.object_id in taken_ids:
            out.append((ref.name, None, f"{ref.path}: object id {ref.object_id!r} is already in the store (another "
                                        "picture with that file name?); give the set a CSV with an id column"))
            continue
        taken_ids.add(ref.object_id)
        rows = {k: v[i:i + 1] for k, v in cols.items()}
        rows["embedding"] = emb[i:i + 1]
        out.append((ref.name, rows, ""))
    return out
