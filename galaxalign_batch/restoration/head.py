"""The denoising head: a small conv U-Net on noise-normalised stamps, optionally fed the frozen
GalaxAlign encoder's patch tokens; save / load (safetensors + JSON); :func:`denoise`.

Normalisation: the input is ``z = noisy / sigma`` per band (``sigma`` the per-pixel noise in
nanomaggies, e.g. ``1 / sqrt(invvar)``), so the noise has unit variance at every depth; the network
sees ``A * asinh(z / A)`` (``A = compress``, default 4: linear in the sky, logarithmic in bright
cores). U-Net: full, 1/2, 1/4 and 1/8 resolution (``width``, 2, 4, 4 x ``width`` channels, two 3x3
convolutions, each followed by a per-pixel normalisation over channels and SiLU, per level; bilinear upsampling
and skip connections). Per band it outputs a noise
estimate ``n``, a direct estimate ``d`` and a gate ``g`` (sigmoid, starting near 0.9), and returns the
noise ``g n + (1 - g) (z - d)``: the residual path suits bright structure, the direct one the empty
sky. The clean estimate is ``(z - noise) * sigma``; training minimises the mean squared error of the
noise, i.e. of the clean image in units of sigma.

The normalisation (``norm="channel"``, the default since 2026-12-06) is a LayerNorm of each pixel's feature
vector (ConvNeXt's channels-first LayerNorm): it has no spatial statistics, so it adds no dependence of a pixel's
output on the size or content of the window it is restored in beyond the network's receptive field (GroupNorm's
statistics would). Without it (``norm="none"``, heads saved before; their files load as they were) the bottleneck's
activations grew into the hundreds at the default learning rate, and a batch's loss spiked to 10^2-10^6 in 5 of 7
runs' first 1000-1500 steps (lr 4e-3 or 2e-3); one head in five trained 7200 steps collapsed to returning the
input (bench/RESULTS.md, "Image restoration").

Features: the token map (width, G, G) goes through a 1x1 projection to ``feature_channels`` and is
sampled (bilinear) at the sky position of each cell of the 1/8-resolution level
(:func:`galaxalign_batch.model.tokens.token_grid`), where it is concatenated to the image features.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.tokens import FoundationEncoder, token_grid
from galaxalign_batch.survey.layout import PIXSCALE

log = logging.getLogger(__name__)

FORMAT = "galaxalign-denoiser"
FORMAT_VERSION = 1
META_KEY = "galaxalign_denoiser"


NORMS = ("channel", "none")   # HeadConfig.norm


@dataclass(frozen=True)
class HeadConfig:
    bands: int = 3
    width: int = 16                 # channels at full resolution (x2, x4 at the lower levels)
    feature_dim: int = 0            # encoder token width; 0: no foundation features (the ablation)
    feature_channels: int = 16      # projected token channels at the 1/8-resolution level
    angular_size: float = 32.0      # arcsec spanned by the token map (the encoder's CutoutSpec)
    pixscale: float = PIXSCALE      # arcsec / px of the stamps
    compress: float = 4.0           # A in A * asinh(z / A)
    norm: str = "channel"           # after each convolution of the blocks: "channel" (per pixel) or "none"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.bands < 1 or self.width < 1 or self.feature_dim < 0 or self.feature_channels < 1:
            raise ConfigError(f"bad denoising head configuration {dataclasses.asdict(self)}")
        if self.angular_size <= 0 or self.pixscale <= 0 or self.compress <= 0:
            raise ConfigError(f"bad denoising head configuration {dataclasses.asdict(self)}")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) map, with a per-channel scale and shift."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _block(c_in: int, c_out: int, stride: int = 1, norm: str = "channel") -> nn.Sequential:
    def after(c: int) -> list[nn.Module]:
        return [ChannelNorm(c), nn.SiLU()] if norm == "channel" else [nn.SiLU()]

    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), *after(c_out),
                         nn.Conv2d(c_out, c_out, 3, padding=1), *after(c_out))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class DenoiseHead(nn.Module):
    """Predicts the noise (units of sigma) of ``z = noisy / sigma``; see the module docstring.

    ``encoder`` (a :class:`FoundationEncoder`) is required when ``config.feature_dim > 0``; it is frozen,
    is not part of ``parameters()`` that train, and is saved with the head.
    """

    def __init__(self, config: HeadConfig, encoder: FoundationEncoder | None = None):
        super().__init__()
        self.config = config
        self.training_settings: dict | None = None     # restoration.train.TrainSettings as saved with the head
        c, w = config, config.width
        if c.feature_dim and encoder is None:
            raise ConfigError("a head with foundation features needs the encoder")
        if encoder is not None and c.feature_dim != encoder.width:
            raise ConfigError(f"feature_dim {c.feature_dim} does not match the encoder's width {encoder.width}")
        self.encoder = encoder if c.feature_dim else None
        self.inc = _block(c.bands, w, norm=c.norm)
        self.down1 = _block(w, 2 * w, stride=2, norm=c.norm)
        self.down2 = _block(2 * w, 4 * w, stride=2, norm=c.norm)
        self.down3 = _block(4 * w, 4 * w, stride=2, norm=c.norm)
        fuse_in = 4 * w + (c.feature_channels if c.feature_dim else 0)
        self.project = nn.Conv2d(c.feature_dim, c.feature_channels, 1) if c.feature_dim else None
        self.fuse = nn.Sequential(nn.Conv2d(fuse_in, 4 * w, 1), nn.SiLU(), nn.Conv2d(4 * w, 4 * w, 3, padding=1),
                                  nn.SiLU())
        self.up3 = _block(4 * w + 4 * w, 4 * w, norm=c.norm)
        self.up2 = _block(4 * w + 2 * w, 2 * w, norm=c.norm)
        self.up1 = _block(2 * w + w, w, norm=c.norm)
        self.out = nn.Conv2d(w, 3 * c.bands, 1)   # per band: noise, direct estimate, gate
        with torch.no_grad():                      # start close to the residual path (gate ~0.9)
            self.out.bias[2 * c.bands:].fill_(2.0)

    @property
    def uses_features(self) -> bool:
        return self.config.feature_dim > 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def forward(self, z: torch.Tensor, tokens: torch.Tensor | None = None,
                centre: torch.Tensor | None = None) -> torch.Tensor:
        """Noise estimate (N, bands, H, W) of ``z`` (N, bands, H, W); ``tokens`` (N, width, G, G) of the
        stamp whose centre pixel is at ``centre`` (N, 2) = (x, y) in ``z``'s pixels (default: the middle)."""
        n, _, h, w = z.shape
        x = self.config.compress * torch.asinh(z / self.config.compress)
        ph, pw = (-h) % 8, (-w) % 8
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        s1 = self.inc(x)
        s2 = self.down1(s1)
        s3 = self.down2(s2)
        s4 = self.down3(s3)
        if self.project is not None:
            if tokens is None:
                raise ConfigError("this head uses foundation features: pass the encoder tokens")
            if centre is None:
                centre = torch.tensor([[(w - 1) / 2.0, (h - 1) / 2.0]], device=z.device).expand(n, 2)
            grid = token_grid(s4.shape[2], s4.shape[3], centre.to(z.device, torch.float32), self.config.pixscale,
                              self.config.angular_size, stride=8)
            feats = F.grid_sample(self.project(tokens), grid, mode="bilinear", padding_mode="border",
                                  align_corners=False)
            s4 = torch.cat([s4, feats], dim=1)
        b = self.fuse(s4)
        u3 = self.up3(torch.cat([_up(b, s3), s3], 1))
        u2 = self.up2(torch.cat([_up(u3, s2), s2], 1))
        u1 = self.up1(torch.cat([_up(u2, s1), s1], 1))
        noise, direct, gate = self.out(u1)[:, :, :h, :w].chunk(3, dim=1)
        g = torch.sigmoid(gate)
        return g * noise + (1 - g) * (z - direct)


# ---------------------------------------------------------------------------------------------- inference

def check_stamps(noisy, bands: int | None, what: str = "noisy stamps") -> np.ndarray:
    """(N, bands, H, W) finite float32 (any band count when ``bands`` is None), or a ConfigError."""
    a = np.asarray(noisy)
    if a.ndim == 3:
        raise ConfigError(f"{what} must be (N, bands, H, W); for one stamp (bands, H, W) add a leading axis")
    if a.ndim != 4:
        raise ConfigError(f"{what} must be (N, bands, H, W), got shape {a.shape}")
    if bands is not None and a.shape[1] != bands:
        raise ConfigError(f"{what} have {a.shape[1]} band(s), the head expects {bands} (g, r, z)")
    if min(a.shape[2:]) < 8:
        raise ConfigError(f"{what} must be at least 8 x 8 px, got {a.shape[2]} x {a.shape[3]}")
    if not np.issubdtype(a.dtype, np.number):
        raise ConfigError(f"{what} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{what} contain NaN or infinite values (mask or fill them first)")
    return a


def check_sigma(sigma, n: int, bands: int) -> np.ndarray:
    """Per-stamp, per-band noise (N, bands) from a number, (bands,) or (N, bands)."""
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim == 0:
        s = np.full((n, bands), float(s))
    elif s.shape == (bands,):
        s = np.broadcast_to(s, (n, bands))
    elif s.shape != (n, bands):
        raise ConfigError(f"sigma must be a number, ({bands},) or ({n}, {bands}), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ConfigError("sigma must be finite and > 0 (per-pixel noise in nanomaggies)")
    return np.ascontiguousarray(s)


def estimate_noise(noisy: np.ndarray) -> np.ndarray:
    """Per-stamp, per-band noise (N, bands) from the image alone: scikit-image's ``estimate_sigma``
    (median absolute deviation of the finest diagonal wavelet coefficients, Donoho & Johnstone)."""
    from skimage.restoration import estimate_sigma

    s = np.array([estimate_sigma(stamp, channel_axis=0) for stamp in noisy], dtype=np.float64)
    return np.maximum(s.reshape(len(noisy), -1), np.finfo(np.float32).tiny)


@torch.no_grad()
def denoise(head: DenoiseHead, noisy, sigma=None, *, batch_size: int = 32, pixscale: float | None = None,
            precision: str = "fp32") -> np.ndarray:
    """Denoised stamps (N, bands, H, W) float32 nanomaggies of ``noisy`` (N, bands, H, W) nanomaggies.

    ``sigma``: the per-pixel noise, a number, (bands,) or (N, bands) in nanomaggies (from the
    inverse variance in real data); None estimates it per stamp and band (:func:`estimate_noise`).
    A head with foundation features cuts each stamp around its centre for the encoder.
    ``precision``: ``fp32`` or ``bf16`` (resolved, :mod:`galaxalign_batch.model.precision`): the head's (and the
    encoder's) forward passes under bf16 autocast; the noise it predicts is subtracted in float32.
    """
    from galaxalign_batch.model.precision import autocast

    noisy = check_stamps(noisy, head.config.bands)
    sig = estimate_noise(noisy) if sigma is None else check_sigma(sigma, len(noisy), head.config.bands)
    pixscale = head.config.pixscale if pixscale is None else float(pixscale)
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    out = np.empty_like(noisy)
    try:
        for i in range(0, len(noisy), batch_size):
            x = noisy[i:i + batch_size]
            s = torch.from_numpy(sig[i:i + batch_size]).float().to(device)[:, :, None, None]
            z = torch.from_numpy(x).to(device) / s
            with autocast(precision, device):
                tokens = head.encoder.tokens(x, pixscale).to(device) if head.uses_features else None
                noise = head(z, tokens).float()
            out[i:i + batch_size] = ((z - noise) * s).cpu().numpy()
    finally:
        head.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- save / load

def save_head(head: DenoiseHead, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``head`` (and its frozen encoder's image tower, if any) to a ``.safetensors`` file atomically."""
    from galaxalign_batch.model.files import write_weights

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "code_version": __version__,
            "config": dataclasses.asdict(head.config),
            "encoder": head.encoder.describe() if head.encoder is not None else None,
            # how it was trained (restoration.train.TrainSettings: steps, noise model, exposures...)
            "training": getattr(head, "training_settings", None),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    return write_weights(path, state, META_KEY, meta)


def read_head_info(path: str | os.PathLike) -> dict:
    """The JSON description of a saved head (no weights read)."""
    from galaxalign_batch.model.files import read_description

    return read_description(path, META_KEY, FORMAT, FORMAT_VERSION, "denoising head")


def load_head(path: str | os.PathLike, device: str | torch.device = "cpu") -> DenoiseHead:
    """A :class:`DenoiseHead` (eval mode) from :func:`save_head`'s file."""
    from galaxalign_batch.model.files import read_weights

    info = read_head_info(path)
    state = read_weights(path)
    try:  # a head saved before the normalisation (2026-12-06) has none
        config = HeadConfig(**{"norm": "none", **info["config"]})
    except TypeError as e:
        raise ConfigError(f"{path}: bad head configuration ({e})") from None
    encoder = None
    if info.get("encoder"):
        enc_state = {k[len("encoder.visual."):]: v for k, v in state.items() if k.startswith("encoder.visual.")}
        encoder = FoundationEncoder.from_description(info["encoder"], enc_state)
    head = DenoiseHead(config, encoder)
    head.training_settings = info.get("training")
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the described head "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return head.to(device).eval()
