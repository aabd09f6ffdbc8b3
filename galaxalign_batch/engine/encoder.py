"""Image encoders for `embed`: a GalaxAlign checkpoint, an off-the-shelf open_clip model, or `tiny`.

``--model`` is parsed by :func:`galaxalign_batch.model.spec.parse_model_spec` (the one grammar of
every command): a checkpoint of ours, ``NAME:TAG`` / ``NAME:/path/to/weights`` (an open_clip model
with a pretrained tag from open_clip's cache, nothing downloaded, or a local weights file), or
``tiny`` (``galaxalign-tiny`` with seeded random weights, so every replica is the same model; smoke
tests only, warned). An open_clip name without weights is refused here: it would embed with random
weights. The identity a store records is :func:`galaxalign_batch.model.spec.model_identity`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.precision import autocast, resolve_precision
from galaxalign_batch.model.spec import TINY_SEED, ModelSpec, parse_model_spec
from galaxalign_batch.model.spec import model_identity as spec_identity
from galaxalign_batch.preprocess import CutoutSpec

log = logging.getLogger(__name__)



@dataclass
class Encoder:
    """A model that turns (N, 3, S, S) RGB cutouts in [0, 1] into L2-normalised (N, D) float32 rows."""

    identity: dict  # name, id (weights hash), kind
    spec: CutoutSpec
    dim: int
    vocabulary: dict | None
    _encode: object  # callable(torch.Tensor (N,3,S,S) float in [0,1]) -> torch.Tensor (N,D)
    device: str = "cpu"
    precision: str = "fp32"  # resolved: fp32 or bf16 (galaxalign_batch.model.precision)

    def describe(self) -> dict:
        return {"identity": self.identity, "cutout_spec": self.spec.to_dict(), "dim": self.dim,
                "vocabulary": self.vocabulary}

    def encode(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """L2-normalised float32 rows of ``pixels`` (uint8 or float in [0, 1]), the model run in
        :attr:`precision` (``fp32``, or ``bf16`` autocast: docs/engine.md, "Precision")."""
        import torch

        with torch.no_grad():
            if torch.device(self.device).type == "cuda":
                return self._encode_cuda(pixels, batch_size)
            out = []
            for i in range(0, len(pixels), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size]))
                x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
                with autocast(self.precision, self.device):
                    y = self._encode(x.to(self.device)).float()
                out.append(self._unit_rows(y).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _unit_rows(self, y):
        """``y`` (float32) as unit rows: a bf16 model's normalised output is rounded to bf16 (norms off by up
        to ~0.4 %), so it is normalised again in float32; fp32 output is left bit for bit as the model gave it."""
        if self.precision == "fp32":
            return y
        import torch

        return torch.nn.functional.normalize(y, dim=-1)

    def _encode_cuda(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """GPU: each batch crosses PCIe as it is stored (uint8 cutouts: a quarter of the float bytes), from
        pinned memory on a side stream while the previous batch runs, and the model runs in
        :attr:`precision` (bf16 autocast by default); one synchronisation at the end. Measured on an H200 with
        ViT-B-16: 6.4x the sources/s of float transfers in fp32, GPU busy 97% (bench/RESULTS.md)."""
        import torch

        dev = torch.device(self.device)
        copy_stream = torch.cuda.Stream(dev)
        compute = torch.cuda.current_stream(dev)
        out, pending = [], None
        starts = list(range(0, len(pixels), batch_size))
        for pos in range(len(starts) + 1):
            staged = None
            if pos < len(starts):
                host = torch.from_numpy(np.ascontiguousarray(pixels[starts[pos]:starts[pos] + batch_size])).pin_memory()
                with torch.cuda.stream(copy_stream):
                    x_dev = host.to(dev, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(copy_stream)
                staged = (x_dev, ready)
            if pending is not None:
                x_dev_prev, ready_prev = pending
                compute.wait_event(ready_prev)
                x_dev_prev.record_stream(compute)
                x = x_dev_prev.float().div_(255.0) if x_dev_prev.dtype == torch.uint8 else x_dev_prev.float()
                with autocast(self.precision, dev):
                    out.append(self._unit_rows(self._encode(x).float()))
            pending = staged
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(out).cpu().numpy()


def _parse_model(model: str) -> ModelSpec:
    """The spec of an ``embed --model`` value: a checkpoint, an open_clip model with weights, or tiny
    (an open_clip name without weights would embed with random weights: refused)."""
    spec = parse_model_spec(model)
    if spec.kind == "open_clip" and spec.random_weights:
        raise ConfigError(f"--model {model!r}: an open_clip model needs its weights, NAME:TAG or NAME:/path/to/weights "
                          "(or a checkpoint file; 'tiny' embeds with random weights for smoke tests)")
    return spec


def model_identity(model: str) -> dict | None:
    """The ``identity`` of :func:`describe_model` read without importing torch or open_clip (a
    checkpoint's safetensors header is parsed by hand), or None when that is not possible. Lets a
    re-run with nothing left to do finish in a second or two."""
    return spec_identity(_parse_model(model))


def describe_model(model: str) -> dict:
    """What :meth:`Encoder.describe` of ``load_encoder(model)`` returns, without building the model.

    Reads only a checkpoint's header or an open_clip config (and hashes a local weights file), so the
    driver of a run knows the cutout spec and the store's attributes while the replicas still load.
    Raises :class:`ConfigError` for a model that does not exist.
    """
    spec = _parse_model(model)
    if spec.kind == "checkpoint":
        from galaxalign_batch.model.checkpoint import read_info

        from galaxalign_batch.vocabulary import Vocabulary

        info = read_info(model)
        return {"identity": spec_identity(spec, info),
                "cutout_spec": CutoutSpec.from_dict(info["cutout_spec"]).to_dict(),
                "dim": int(info["open_clip"]["config"]["embed_dim"]),
                "vocabulary": Vocabulary.from_dict(info["vocabulary"], model).to_dict()}
    from galaxalign_batch.model.config import model_config

    cfg = model_config(spec.name)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"identity": spec_identity(spec), "cutout_spec": CutoutSpec(out_size=int(size)).to_dict(),
            "dim": int(cfg["embed_dim"]), "vocabulary": None}


def load_encoder(model: str, device: str = "cpu", precision: str = "auto") -> Encoder:
    """The encoder named by an ``embed --model`` value (see the module docstring), its forward passes in
    ``precision`` (``auto``: bf16 where ``device`` runs it natively, else fp32; :mod:`galaxalign_batch.model.precision`)."""
    spec = _parse_model(model)
    resolved = resolve_precision(precision, device)
    if spec.kind == "checkpoint":
        enc = _from_checkpoint(spec, device)
    else:
        if spec.kind == "tiny":
            log.warning("--model tiny: the tiny test config with RANDOM weights; embeddings are meaningless "
                        "beyond smoke tests (train a model with 'galaxalign-batch train' and pass its checkpoint)")
        enc = _from_open_clip(spec, device)
    enc.precision = resolved
    return enc


def _from_checkpoint(model: ModelSpec, device: str) -> Encoder:
    from galaxalign_batch.model.checkpoint import load_checkpoint

    m = load_checkpoint(model.name, device=device)
    spec = CutoutSpec.from_dict(m.info["cutout_spec"])
    return Encoder(spec_identity(model, m.info), spec, m.embed_dim, m.vocabulary.to_dict(),
                   lambda x: m.encode_images(x, batch_size=len(x)), device)


def _from_open_clip(model: ModelSpec, device: str) -> Encoder:
    import torch
    import torch.nn.functional as F

    from galaxalign_batch.model.inputs import prepare_images

    from galaxalign_batch.model.config import create_clip

    if model.kind == "tiny":
        torch.manual_seed(TINY_SEED)
    clip, cfg, pre = create_clip(model.name, model.weights)
    clip = clip.to(device).eval()
    size = int(pre["size"])
    mean = torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], device=device).view(1, 3, 1, 1)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(clip.encode_image(prepare_images(x, size, mean, std)), dim=-1)

    return Encoder(spec_identity(model), CutoutSpec(out_size=size), int(cfg["embed_dim"]),
                   None, encode, device)
