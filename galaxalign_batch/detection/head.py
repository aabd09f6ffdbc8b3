"""The learned detection head: CenterNet-style centre heatmap + offset + size on the frozen GalaxAlign
encoder's patch tokens (and a small convolutional path on the field's pixels); decode, save / load.

Input: a field ``(3, S, S)`` nanomaggies (g, r, z) and its per-band noise; the network sees
``asinh(z / A)`` of ``z = image / sigma`` (``fields.normalise``). Pixel path: three stages at 1/2,
1/4, 1/8 and 1/16 resolution (``width``, 2, 4, 4 x ``width`` channels), the two coarse ones brought
back to 1/4 (bilinear) and concatenated. Foundation path: the encoder (``FoundationEncoder`` of
``restoration.features``: the cutout the encoder was trained on, centred on the field's centre,
``angular_size`` 32" -> 8 x 8 tokens of 4" for the shipped tiny ViT) gives a ``(width, G, G)`` token
map; a 1x1 projection to ``feature_channels`` is sampled (bilinear) at the sky position of every
1/4-resolution cell (``model.tokens.token_grid``) and concatenated. Three heads at stride 4: centre
heatmap (sigmoid), sub-cell offset (px / 4) and log box width / height (px).

Training targets (``targets``): a Gaussian peak per truth box at its centre cell (sigma in cells
``max(0.5, sqrt(w h) / stride / 6)``), the penalty-reduced focal loss of CenterNet (alpha 2, beta
4) on the heatmap, L1 on the offset and the log size at the centre cells. Decoding: 3 x 3 max-pool
peaks, the ``max_detections`` best, boxes ``centre +- size / 2``.

``feature_dim = 0`` is the ablation without the foundation (pixel path only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.tokens import FoundationEncoder, token_grid
from galaxalign_batch.survey.layout import PIXSCALE

STRIDE = 4


@dataclass(frozen=True)
class DetectorConfig:
    bands: int = 3
    width: int = 24                 # channels at 1/2 resolution (x2, x4 below)
    feature_dim: int = 0            # encoder token width; 0: no foundation features (the ablation)
    feature_channels: int = 32      # projected token channels at the 1/4-resolution level
    angular_size: float = 32.0      # arcsec spanned by the token map (the encoder's CutoutSpec)
    pixscale: float = PIXSCALE      # arcsec / px of the fields
    compress: float = 4.0           # A in asinh(z / A)
    field: int = 128                # px: the training fields' side (windows of a tile at apply time)
    max_detections: int = 100

    def __post_init__(self):
        if self.bands < 1 or self.width < 1 or self.feature_dim < 0 or self.feature_channels < 1:
            raise ConfigError(f"bad detection head configuration {dataclasses.asdict(self)}")
        if self.angular_size <= 0 or self.pixscale <= 0 or self.compress <= 0 or self.field < 16:
            raise ConfigError(f"bad detection head configuration {dataclasses.asdict(self)}")


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU())


class DetectionHead(nn.Module):
    """Centre heatmap, offset and size at stride 4 (see the module docstring)."""

    def __init__(self, config: DetectorConfig, encoder: FoundationEncoder | None = None):
        super().__init__()
        c, w = config, config.width
        self.config = config
        if c.feature_dim and encoder is None:
            raise ConfigError("a head with foundation features needs the encoder")
        if encoder is not None and c.feature_dim and c.feature_dim != encoder.width:
            raise ConfigError(f"feature_dim {c.feature_dim} does not match the encoder's width {encoder.width}")
        self.encoder = encoder if c.feature_dim else None
        self.s2 = _conv(c.bands, w, 2)
        self.s4 = _conv(w, 2 * w, 2)
        self.s8 = _conv(2 * w, 4 * w, 2)
        self.s16 = _conv(4 * w, 4 * w, 2)
        self.project = nn.Conv2d(c.feature_dim, c.feature_channels, 1) if c.feature_dim else None
        fuse_in = 2 * w + 4 * w + 4 * w + (c.feature_channels if c.feature_dim else 0)
        self.fuse = nn.Sequential(nn.Conv2d(fuse_in, 4 * w, 1), nn.SiLU(), nn.Conv2d(4 * w, 4 * w, 3, padding=1),
                                  nn.SiLU())
        self.heat = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 1, 1))
        self.offset = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2, 1))
        self.size = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2, 1))
        with torch.no_grad():
            self.heat[-1].bias.fill_(-2.19)         # CenterNet's prior: sigmoid ~0.1
            self.size[-1].bias.fill_(float(np.log(16.0)))

    @property
    def uses_features(self) -> bool:
        return self.config.feature_dim > 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None,
                centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of the heatmap (N, 1, H/4, W/4), offsets (N, 2, ...), log sizes (N, 2, ...) of normalised
        fields ``x`` (N, bands, H, W); ``tokens`` (N, width, G, G) of an encoder cutout centred at ``centre``
        (N, 2) = (x, y) pixels (default: the field's middle)."""
        n, _, h, w = x.shape
        ph, pw = (-h) % 16, (-w) % 16
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        a = self.s4(self.s2(x))
        b = self.s8(a)
        c = self.s16(b)
        up = lambda t: F.interpolate(t, size=a.shape[2:], mode="bilinear", align_corners=False)  # noqa: E731
        parts = [a, up(b), up(c)]
        if self.project is not None:
            if tokens is None:
                raise ConfigError("this head uses foundation features: pass the encoder tokens")
            if centre is None:
                centre = torch.tensor([[(w - 1) / 2.0, (h - 1) / 2.0]], device=x.device).expand(n, 2)
            grid = token_grid(a.shape[2], a.shape[3], centre.to(x.device, torch.float32), self.config.pixscale,
                              self.config.angular_size, stride=STRIDE)
            parts.append(F.grid_sample(self.project(tokens), grid, mode="bilinear", padding_mode="border",
                                       align_corners=False))
        f = self.fuse(torch.cat(parts, 1))
        gh, gw = -(-h // STRIDE), -(-w // STRIDE)
        return self.heat(f)[:, :, :gh, :gw], self.offset(f)[:, :, :gh, :gw], self.size(f)[:, :, :gh, :gw]


# ---------------------------------------------------------------------------------------------- targets, loss

def cell_of(x) -> np.ndarray:
    """Continuous cell coordinate of pixel coordinate ``x`` (cell ``i`` covers pixels ``4i .. 4i + 3``)."""
    return (np.asarray(x, np.float64) - (STRIDE - 1) / 2.0) / STRIDE


def targets(boxes: list[np.ndarray], height: int, width: int) -> dict[str, torch.Tensor]:
    """Heatmap (N, 1, h, w), centre-cell mask (N, h, w), offsets and log sizes (N, 2, h, w) of truth boxes."""
    gh, gw = -(-height // STRIDE), -(-width // STRIDE)
    n = len(boxes)
    heat = np.zeros((n, 1, gh, gw), np.float32)
    mask = np.zeros((n, gh, gw), bool)
    off = np.zeros((n, 2, gh, gw), np.float32)
    size = np.zeros((n, 2, gh, gw), np.float32)
    yy, xx = np.mgrid[0:gh, 0:gw]
    for k, bx in enumerate(boxes):
        bx = np.asarray(bx, np.float64).reshape(-1, 4)
        bw, bh = bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]
        order = np.argsort(-(bw * bh))           # small boxes last: their cells win a collision
        for i in order:
            u, v = cell_of((bx[i, 0] + bx[i, 2]) / 2), cell_of((bx[i, 1] + bx[i, 3]) / 2)
            cu, cv = int(np.clip(np.round(u), 0, gw - 1)), int(np.clip(np.round(v), 0, gh - 1))
            s = max(0.5, np.sqrt(max(bw[i] * bh[i], 1.0)) / STRIDE / 6.0)
            g = np.exp(-((xx - cu) ** 2 + (yy - cv) ** 2) / (2 * s * s))
            heat[k, 0] = np.maximum(heat[k, 0], g)
            mask[k, cv, cu] = True
            off[k, :, cv, cu] = (u - cu, v - cv)
            size[k, :, cv, cu] = (np.log(max(bw[i], 1.0)), np.log(max(bh[i], 1.0)))
    return {"heat": torch.from_numpy(heat), "mask": torch.from_numpy(mask), "offset": torch.from_numpy(off),
            "size": torch.from_numpy(size)}


def loss(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tgt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CenterNet losses: focal (heatmap, per object), L1 offset and L1 log size at the centre cells."""
    logits, off, size = out
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    gt = tgt["heat"]
    pos = tgt["mask"][:, None].float()
    n_pos = pos.sum().clamp(min=1.0)
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - gt) ** 4 * (1 - pos)).sum()
    m = tgt["mask"][:, None].expand_as(off)
    l_off = F.l1_loss(off[m], tgt["offset"][m], reduction="sum") / n_pos
    l_size = F.l1_loss(size[m], tgt["size"][m], reduction="sum") / n_pos
    heat = (pos_loss + neg_loss) / n_pos
    return {"heatmap": heat, "offset": l_off, "size": l_size, "total": heat + l_off + l_size}


@torch.no_grad()
def decode(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_detections: int = 100,
           min_score: float = 0.01) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image ``(boxes (k, 4) x0, y0, x1, y1 px, scores (k,))`` from the head's output, best first."""
    logits, off, size = out
    p = torch.sigmoid(logits)
    peaks = (p == F.max_pool2d(p, 3, stride=1, padding=1)) & (p >= min_score)
    res = []
    gw = p.shape[3]
    for k in range(p.shape[0]):
        flat = torch.where(peaks[k, 0].flatten(), p[k, 0].flatten(), torch.zeros(()))
        top = torch.topk(flat, min(max_detections, flat.numel()))
        keep = top.values >= min_score
        idx, sc = top.indices[keep], top.values[keep]
        cv, cu = idx // gw, idx % gw
        ox, oy = off[k, 0].flatten()[idx], off[k, 1].flatten()[idx]
        sw, sh = size[k, 0].flatten()[idx].clamp(-2, 8).exp(), size[k, 1].flatten()[idx].clamp(-2, 8).exp()
        cx = (cu.float() + ox) * STRIDE + (STRIDE - 1) / 2.0
        cy = (cv.float() + oy) * STRIDE + (STRIDE - 1) / 2.0
        boxes = torch.stack([cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2], 1)
        res.append((boxes.numpy().astype(np.float32), sc.numpy().astype(np.float32)))
    return res


@torch.no_grad()
def predict(head: DetectionHead, images: np.ndarray, sigma: np.ndarray, *, pixscale: float | None = None,
            batch_size: int = 32, min_score: float = 0.01, tokens: torch.Tensor | None = None,
            precision: str = "fp32") -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes and scores of fields ``images`` (N, 3, S, S) nanomaggies with noise ``sigma`` (N, 3); ``precision``
    (resolved fp32 or bf16): the forward passes (encoder and head) under bf16 autocast, decoding in float32."""
    from galaxalign_batch.detection.fields import normalise
    from galaxalign_batch.model.precision import autocast

    head.eval()
    device = next(head.parameters()).device
    pixscale = head.config.pixscale if pixscale is None else float(pixscale)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(normalise(images[i:i + batch_size], sigma[i:i + batch_size], head.config.compress))
        tok = None
        with autocast(precision, device):
            if head.uses_features:
                tok = tokens[i:i + batch_size] if tokens is not None else head.encoder.tokens(images[i:i + batch_size],
                                                                                              pixscale)
            raw = head(x, tok)
        out += decode(tuple(o.float() for o in raw), head.config.max_detections, min_score)
    return out
