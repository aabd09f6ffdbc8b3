"""Cutouts as pictures: ``(S, S, 3)`` uint8 arrays north up, and PNG data URLs (search, report, labelling)."""

from __future__ import annotations

import numpy as np

__all__ = ["to_rgb8", "png_base64"]


def to_rgb8(pixels: np.ndarray, orientation: str = "north-up") -> np.ndarray:
    """A cutout ``(3, S, S)`` (float in [0, 1] or uint8) as an ``(S, S, 3)`` uint8 picture, north up.

    ``orientation``: the cutout's (``CutoutSpec.orientation`` of the store). North-up cutouts are shown
    as they are; ``"fits"`` ones (stores written before orientation was recorded: row 0 is the tile's
    first pixel row, south for Legacy Survey WCS) are flipped vertically, as the viewer shows them.
    """
    p = np.asarray(pixels)
    if p.dtype != np.uint8:
        p = np.clip(np.nan_to_num(p.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5
        p = p.astype(np.uint8)
    p = np.transpose(p, (1, 2, 0))
    return np.ascontiguousarray(p[::-1] if orientation == "fits" else p)


def png_base64(rgb: np.ndarray, scale: int = 1) -> str:
    """A ``data:image/png;base64,...`` URL of an (H, W, 3) uint8 picture (nearest-neighbour upscaled)."""
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
