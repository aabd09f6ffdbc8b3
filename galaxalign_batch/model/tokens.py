"""Frozen GalaxAlign image-encoder patch tokens of nanomaggy stamps: the features of the downstream heads
that work on pixels (the denoising head of ``restoration``, the detection head of ``detection``).

A stamp (bands, S, S) in nanomaggies is cut and stretched exactly as the encoder was trained
(``preprocess.make_cutouts`` with the checkpoint's ``CutoutSpec``, centred on the stamp's centre
pixel ``((S-1)/2, (S-1)/2)``), normalised (``GalaxAlignModel.prepare_images``) and passed through the
open_clip ViT with ``output_tokens``: the patch tokens after ``ln_post`` form a (width, G, G) map
covering the cutout's ``angular_size``. The head samples that map at each of its pixels' sky
positions (see :func:`token_grid`). A stamp smaller than the cutout's footprint leaves the rest of
the cutout masked (``fill``, black): the encoder then sees a black frame it was not trained on.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.inputs import prepare_images
from galaxalign_batch.preprocess import CutoutSpec, make_cutouts
from galaxalign_batch.survey.layout import BANDS


class FoundationEncoder(nn.Module):
    """The frozen image tower of a GalaxAlign model and the preprocessing that goes with it."""

    def __init__(self, visual: nn.Module, open_clip_config: dict, preprocess: dict, cutout_spec: dict, source: dict):
        super().__init__()
        if not all(hasattr(visual, a) for a in ("output_tokens", "conv1", "transformer", "ln_post")):
            raise ConfigError(f"the denoising head needs an open_clip VisionTransformer image tower, "
                              f"got {type(visual).__name__}")
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.preprocess = {"size": int(preprocess["size"]), "mean": [float(v) for v in preprocess["mean"]],
                           "std": [float(v) for v in preprocess["std"]]}
        self.spec = CutoutSpec.from_dict(cutout_spec)
        self.open_clip_config = copy.deepcopy(open_clip_config)
        self.source = dict(source)
        self.width = int(visual.conv1.out_channels)
        self.grid = self.preprocess["size"] // int(visual.conv1.kernel_size[0])
        self.register_buffer("_mean", torch.tensor(self.preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.preprocess["std"]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_model(cls, model, source: str) -> "FoundationEncoder":
        """From a :class:`GalaxAlignModel` (its image tower is copied, so the model can be dropped)."""
        visual = copy.deepcopy(model.clip.visual).cpu()
        return cls(visual, model.info["open_clip"]["config"], model.info["preprocess"], model.info["cutout_spec"],
                   {"source": source})

    @classmethod
    def from_description(cls, desc: dict, weights: dict[str, torch.Tensor]) -> "FoundationEncoder":
        """Rebuild from :meth:`describe` and the image tower's weights (as stored with a head)."""
        from galaxalign_batch.model.config import build_clip_from_config

        visual = build_clip_from_config(desc["open_clip_config"]).visual
        visual.load_state_dict(weights)
        source = {k: v for k, v in desc.items()
                  if k not in ("open_clip_config", "preprocess", "cutout_spec", "width", "grid", "weights_digest")}
        return cls(visual, desc["open_clip_config"], desc["preprocess"], desc["cutout_spec"], source)

    def describe(self) -> dict:
        """JSON-able description stored with a head (the weights travel as ``encoder.*`` tensors)."""
        return {"open_clip_config": self.open_clip_config, "preprocess": self.preprocess,
                "cutout_spec": self.spec.to_dict(), "width": self.width, "grid": self.grid,
                "weights_digest": self.weights_digest(), **self.source}

    def train(self, mode: bool = True) -> "FoundationEncoder":
        """The encoder stays in eval mode whatever the head it belongs to does (it is frozen)."""
        super().train(mode)
        self.visual.eval()
        return self

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.visual.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def rgb(self, flux: np.ndarray, pixscale: float) -> np.ndarray:
        """The encoder's RGB cutouts (N, 3, s, s) of nanomaggy stamps (N, bands, S, S), centred on each stamp."""
        flux = np.asarray(flux, dtype=np.float32)
        n, _, h, w = flux.shape
        out = np.empty((n, 3, self.spec.out_size, self.spec.out_size), np.float32)
        cx, cy = np.array([(w - 1) / 2.0]), np.array([(h - 1) / 2.0])
        bands = BANDS[: flux.shape[1]]
        for i in range(n):
            out[i] = make_cutouts(flux[i], None, cx, cy, pixscale, self.spec, bands=bands).pixels[0]
        return out

    @torch.no_grad()
    def tokens(self, flux: np.ndarray, pixscale: float, batch_size: int = 64) -> torch.Tensor:
        """Patch tokens (N, width, G, G) float32 of nanomaggy stamps (N, bands, S, S)."""
        rgb = torch.from_numpy(self.rgb(flux, pixscale))
        device = self._mean.device
        outs = []
        previous = self.visual.output_tokens
        self.visual.output_tokens = True
        try:
            for i in range(0, len(rgb), batch_size):
                x = rgb[i:i + batch_size].to(device)
                _, tok = self.visual(prepare_images(x, self.preprocess["size"], self._mean, self._std))
                g = int(round(tok.shape[1] ** 0.5))
                outs.append(tok.float().transpose(1, 2).reshape(len(x), tok.shape[2], g, g))
        finally:
            self.visual.output_tokens = previous
        return torch.cat(outs) if outs else torch.empty(0, self.width, self.grid, self.grid)


def token_grid(height: int, width: int, centre: torch.Tensor, pixscale: float, angular_size: float,
               stride: int = 1) -> torch.Tensor:
    """``grid_sample`` coordinates (N, height, width, 2) of pixels on the token map.

    Output pixel (i, j) stands for input pixels ``stride * i + (stride - 1) / 2`` (rows) and likewise
    for columns of an image whose cutout was centred at ``centre`` (N, 2) = (x, y) in that image's
    pixels. The token map spans the cutout's ``angular_size`` (normalised coordinates -1..1,
    ``align_corners=False``), so ``u = (p - c) * pixscale / (angular_size / 2)``.
    """
    dev = centre.device
    rows = torch.arange(height, device=dev, dtype=torch.float32) * stride + (stride - 1) / 2.0
    cols = torch.arange(width, device=dev, dtype=torch.float32) * stride + (stride - 1) / 2.0
    k = pixscale / (angular_size / 2.0)
    u = (cols[None, :] - centre[:, 0:1]) * k                  # (N, W): x
    v = (rows[None, :] - centre[:, 1:2]) * k                  # (N, H): y
    return torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)


# ---------------------------------------------------------------------------------------------- loading

def load_token_encoder(model: str | os.PathLike) -> FoundationEncoder:
    """The frozen image tower of ``--model``: a checkpoint (file or folder), a compact foundation file
    (``pretrain --export``, e.g. the shipped ``data/foundation-tiny.safetensors``: only its image tower is
    read) or ``tiny`` (seeded random weights, for tests)."""

    from galaxalign_batch.model.spec import parse_model_spec

    text = os.fspath(model)
    if text == "tiny":
        from galaxalign_batch.model.train import TrainConfig, build_model

        torch.manual_seed(0)
        return FoundationEncoder.from_model(build_model(TrainConfig(data="", out="")),
                                            "galaxalign-tiny, random weights (torch seed 0)")
    if os.path.isfile(text):
        from galaxalign_batch.model.checkpoint import COMPACT_KEY
        from galaxalign_batch.model.files import description_keys

        if COMPACT_KEY in description_keys(text):  # "not a safetensors file" for anything else unreadable
            from safetensors.torch import load_file

            from galaxalign_batch.model.config import build_clip_from_config
            from galaxalign_batch.model.pretrain import read_compact

            info = read_compact(text)["info"]
            visual = build_clip_from_config(info["open_clip"]["config"]).visual
            state = {k[len("clip.visual."):]: v.float() for k, v in load_file(text).items()
                     if k.startswith("clip.visual.")}
            visual.load_state_dict(state)
            return FoundationEncoder(visual, info["open_clip"]["config"], info["preprocess"], info["cutout_spec"],
                                     {"source": str(Path(text).resolve()),
                                      "foundation_digest": info.get("weights_digest")})
    spec = parse_model_spec(text)
    if spec.kind != "checkpoint":
        raise ConfigError(f"--model {text}: a head on patch tokens needs one of our checkpoints or a compact "
                          f"foundation file (or 'tiny' for tests), not an open_clip model")
    from galaxalign_batch.model import load_checkpoint

    return FoundationEncoder.from_model(load_checkpoint(spec.path), str(Path(spec.path).resolve()))
