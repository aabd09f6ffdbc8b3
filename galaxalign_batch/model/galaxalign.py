"""`GalaxAlignModel`: an open_clip model plus an optional symbol encoder and linear head, self-describing.

- ``clip``: the open_clip model (image tower ``clip.visual``, text tower, ``logit_scale``).
- ``symbol_encoder``: stage 2 of tri-modal training: a deep copy of ``clip.visual`` made by
  :meth:`init_symbol_encoder`; before that (stage 1, baselines) symbols go through ``clip.visual``.
- ``classifier``: the ``image-only`` baseline's linear head on the image embedding.
- ``info``: JSON-able description (open_clip name and config, input size / mean / std, mode,
  vocabulary, symbol set, CutoutSpec, code version) that checkpoints store, so that the
  preprocessing of training can be reproduced from the checkpoint alone.

Images given to the ``encode_*`` methods are (N, 3, S, S) RGB in [0, 1] (float) or 0..255 (uint8),
as :func:`galaxalign_batch.preprocess.make_cutouts` makes them; they are resized to the model's
input size when S differs and normalised with the model's mean / std.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.symbols import SymbolSet
from galaxalign_batch.vocabulary import Vocabulary

log = logging.getLogger(__name__)

MODES = ("trimodal", "image-text", "image-only")
PROTOTYPE_KINDS = ("text", "symbol", "combined")
MAX_LOGIT_SCALE = math.log(100.0)


class GalaxAlignModel(nn.Module):
    def __init__(self, clip: nn.Module, info: dict, tokenizer, vocabulary: Vocabulary, symbols: SymbolSet | None,
                 symbol_encoder: nn.Module | None = None, classifier: nn.Linear | None = None):
        super().__init__()
        if info.get("mode") not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {info.get('mode')!r}")
        self.clip = clip
        self.symbol_encoder = symbol_encoder
        self.classifier = classifier
        self.info = info
        self.tokenizer = tokenizer
        self.vocabulary = vocabulary
        self.symbols = symbols
        pre = info["preprocess"]
        self.image_size = int(pre["size"])
        self.register_buffer("_mean", torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ structure
    @property
    def mode(self) -> str:
        return self.info["mode"]

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def embed_dim(self) -> int:
        return int(self.info["open_clip"]["config"]["embed_dim"])

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier ``exp(log_scale)`` of the similarity logits (1 / temperature)."""
        return self.clip.logit_scale.exp()

    def init_symbol_encoder(self) -> None:
        """Stage 2: the symbol encoder starts as an independent deep copy of the image encoder."""
        self.symbol_encoder = copy.deepcopy(self.clip.visual)
        self.info["has_symbol_encoder"] = True

    def add_classifier(self, n_classes: int) -> None:
        self.classifier = nn.Linear(self.embed_dim, n_classes).to(self.device)
        self.info["classifier_classes"] = n_classes

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ differentiable parts
    def prepare_images(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """RGB (N,3,S,S) in [0,1] (or uint8) -> normalised model input on the model's device."""
        from galaxalign_batch.model.inputs import prepare_images

        x = torch.as_tensor(pixels)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"images must be (N, 3, S, S), got shape {tuple(x.shape)}")
        return prepare_images(x.to(self.device, non_blocking=True), self.image_size, self._mean, self._std)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def forward(self, images: torch.Tensor | None = None, symbols: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Normalised features of prepared inputs (and the linear head's logits for images when present)."""
        out: dict[str, torch.Tensor] = {}
        shared = images is not None and symbols is not None and self.symbol_encoder is None
        if shared:  # stage 1: one pass of the shared image encoder over images and symbols
            raw, raw_symbols = self.clip.visual(torch.cat([images, symbols])).split([len(images), len(symbols)])
            out["symbol"] = F.normalize(raw_symbols, dim=-1)
        elif images is not None:
            raw = self.clip.visual(images)
        if images is not None:
            out["image"] = F.normalize(raw, dim=-1)
            if self.classifier is not None:
                out["logits"] = self.classifier(raw)
        if symbols is not None and not shared:
            encoder = self.symbol_encoder if self.symbol_encoder is not None else self.clip.visual
            out["symbol"] = F.normalize(encoder(symbols), dim=-1)
        if tokens is not None:
            out["text"] = self.clip.encode_text(tokens, normalize=True)
        return out

    # ------------------------------------------------------------------ inference API
    @torch.no_grad()
    def _encode(self, pixels, which: str, batch_size: int) -> torch.Tensor:
        key = {"images": "image", "symbols": "symbol"}[which]
        was_training = self.training
        self.eval()
        try:
            outs = [self(**{which: self.prepare_images(pixels[i:i + batch_size])})[key].float()
                    for i in range(0, len(pixels), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, self.embed_dim, device=self.device)

    def encode_images(self, pixels: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) float32 on the model's device."""
        return self._encode(pixels, "images", batch_size)

    def encode_symbols(self, pixels: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised symbol embeddings (symbol encoder after stage 2, else the image encoder)."""
        return self._encode(pixels, "symbols", batch_size)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) float32."""
        was_training = self.training
        self.eval()
        try:
            outs = [self(tokens=self.tokenize(texts[i:i + batch_size]))["text"].float()
                    for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(outs)

    @torch.no_grad()
    def class_prototypes(self, kind: str = "combined", symbols_per_class: int = 16) -> torch.Tensor:
        """Normalised class prototypes (K, D): mean text embedding over each class's prompts, mean symbol
        embedding over ``symbols_per_class`` deterministic symbols (canonical + augmented), or both summed."""
        if kind not in PROTOTYPE_KINDS:
            raise ConfigError(f"prototype kind must be one of {PROTOTYPE_KINDS}, got {kind!r}")
        if kind == "combined":
            return F.normalize(self.class_prototypes("text") + self.class_prototypes("symbol", symbols_per_class), dim=-1)
        k = len(self.vocabulary)
        if kind == "text":
            prompts = [self.vocabulary.prompts(i) for i in range(k)]
            flat = self.encode_text([p for ps in prompts for p in ps])
            owner = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps], device=flat.device)
        else:
            if self.symbols is None:
                raise ConfigError("this model has no symbol set")
            images, labels = self.symbols.prototype_images(symbols_per_class, seed=0)
            flat = self.encode_symbols(images)
            owner = torch.as_tensor(labels, device=flat.device)
        sums = torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, owner, flat)
        return F.normalize(sums, dim=-1)

    @torch.no_grad()
    def classify(self, pixels, method: str = "combined", batch_size: int = 256) -> torch.Tensor:
        """Class probabilities (N, K): zero-shot through prototypes (``text``/``symbol``/``combined``) or ``head``."""
        if method == "head":
            if self.classifier is None:
                raise ConfigError("this model has no linear head (only --mode image-only trains one)")
            was_training = self.training
            self.eval()
            try:
                logits = torch.cat([self(images=self.prepare_images(pixels[i:i + batch_size]))["logits"].float()
                                    for i in range(0, len(pixels), batch_size)])
            finally:
                self.train(was_training)
            return logits.softmax(-1)
        feats = self.encode_images(pixels, batch_size)
        return (self.logit_scale * feats @ self.class_prototypes(method).T).softmax(-1)

    # ------------------------------------------------------------------ which weights train
    def set_trainable(self, layers: str = "all", *, text: bool = True, temperature: bool = True) -> int:
        """Freeze everything, then unfreeze per ``layers``: ``all``, ``last:N`` (last N blocks of each tower
        plus final norms and projections) or ``proj`` (final norms and projections). The text tower only when
        ``text``; ``logit_scale`` only when ``temperature``; a linear head always. Returns the trainable count."""
        for p in self.parameters():
            p.requires_grad_(False)
        towers: list[tuple[nn.Module, str]] = [(self.clip.visual, "visual")]
        if self.symbol_encoder is not None:
            towers.append((self.symbol_encoder, "visual"))
        if text:
            towers.append((self.clip, "text"))
        for module, kind in towers:
            _unfreeze(module, kind, layers)
        self.clip.logit_scale.requires_grad_(temperature)
        if self.classifier is not None:
            for p in self.classifier.parameters():
                p.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _parse_layers(layers: str) -> tuple[str, int]:
    if layers in ("all", "proj"):
        return layers, 0
    if layers.startswith("last:"):
        try:
            n = int(layers[5:])
        except ValueError:
            n = -1
        if n >= 1:
            return "last", n
    raise ConfigError(f"--train-layers must be 'all', 'proj' or 'last:N' with N >= 1, got {layers!r}")


def _unfreeze(module: nn.Module, kind: str, layers: str) -> None:
    what, n = _parse_layers(layers)
    if kind == "visual":
        tower = module
        heads = [getattr(tower, name, None) for name in ("ln_post", "proj", "head", "attn_pool")]
        blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    else:  # the text tower of an open_clip CLIP (attributes on the CLIP) or CustomTextCLIP (.text)
        tower = getattr(module, "text", None) or module
        heads = [getattr(tower, name, None) for name in ("ln_final", "text_projection", "proj")]
        blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
        if tower is module:  # CLIP: do not touch the image tower or logit_scale through `module`
            params = [p for name, p in module.named_parameters()
                      if not name.startswith("visual.") and not name.startswith("logit_")]
            if what == "all":
                for p in params:
                    p.requires_grad_(True)
                return
    if what == "all":
        for p in tower.parameters():
            p.requires_grad_(True)
        return
    if what == "last":
        if blocks is None:
            raise ConfigError(f"--train-layers last:N needs a transformer tower with resblocks; "
                              f"this {kind} tower is {type(tower).__name__}")
        for block in list(blocks)[-n:]:
            for p in block.parameters():
                p.requires_grad_(True)
    found = False
    for h in heads:
        if isinstance(h, nn.Parameter):
            h.requires_grad_(True)
            found = True
        elif isinstance(h, nn.Module):
            for p in h.parameters():
                p.requires_grad_(True)
            found = True
    if not found:
        raise ConfigError(f"cannot find the projection of the {kind} tower ({type(tower).__name__})")
