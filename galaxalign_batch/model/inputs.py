"""What a model is given: images resized and normalised the one way, and the device it runs on.

Every path into an image tower (training, evaluation, ``embed``'s encoders, the restoration head's
tokens, ``search --image``) resizes with :func:`resize_images` (bilinear with antialiasing, so a
larger cutout is averaged rather than aliased) and normalises with :func:`prepare_images`; every
``--device`` is resolved by :func:`resolve_device`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from galaxalign_batch.errors import ConfigError

__all__ = ["resize_images", "prepare_images", "resolve_device"]


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), bilinear with antialiasing (unchanged when already that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def prepare_images(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, S, S) in [0, 1] (float) or 0..255 (uint8) -> the model's normalised (N, 3, size, size) float input.

    ``mean`` and ``std`` broadcast against (N, 3, 1, 1) and sit on ``x``'s device."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"images must be (N, 3, S, S), got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (resize_images(x, size) - mean) / std


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> a GPU when there is one, else the CPU; ``cuda`` without a GPU is a ConfigError."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}") from None
