"""The text and symbol towers of a store's model, for `search --text` and `search --symbol`.

A store keeps image embeddings only; a text or a drawn symbol meets them in the shared embedding
space through the *other* towers of the model the store was embedded with:

- a GalaxAlign checkpoint (``trimodal`` or ``image-text``): its text tower, and its symbol encoder
  (after tri-modal stage 2; before that, and for ``image-text`` checkpoints, symbols go through the
  image tower, as :meth:`GalaxAlignModel.encode_symbols` does). An ``image-only`` checkpoint's text
  tower never trained against its images: it is refused for both;
- an open_clip model (``NAME:TAG``, ``NAME:/weights``, ``tiny``): CLIP's text tower; a symbol goes
  through its image tower (it never learnt symbols: warned).

The model must be the store's (its identity, :func:`galaxalign_batch.model.spec.model_identity`,
equals the store's ``model.id``); anything else is refused before weights are loaded.

A user's sketch (:func:`read_sketch`) is preprocessed as the model's own user symbols are
(:mod:`galaxalign_batch.model.symbols`: RGB, resized to twice the symbol size, then to the symbol
size, bilinear), after being turned bright-on-dark like the drawn symbols when it is drawn dark on
a light background (a pen on paper or a white canvas).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from galaxalign_batch.downstream.common import QueryError
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore

log = logging.getLogger(__name__)

__all__ = ["Towers", "load_towers", "read_sketch"]


@dataclass
class Towers:
    """The text and symbol encoders of one model, each ``None`` when the model has no such tower."""

    identity: dict
    describe: str
    symbol_size: int
    encode_text: Callable[[list[str]], np.ndarray] | None  # texts -> (n, D) float32, unit rows
    encode_symbols: Callable[[np.ndarray], np.ndarray] | None  # (n, 3, S, S) float in [0, 1] -> (n, D)
    symbol_note: str = ""


def _refuse(model: str, why: str) -> ConfigError:
    return ConfigError(f"--model {model}: {why}")


def load_towers(store: EmbeddingStore, model: str | None, *, need: str, device: str = "cpu") -> Towers:
    """The towers of ``model`` checked against ``store`` (``need``: ``"text"`` or ``"symbol"``, for messages).

    Raises
    ------
    ConfigError
        No ``--model``, or a model without the tower (an ``image-only`` checkpoint).
    ModelMismatchError
        A model other than the store's.
    """
    from galaxalign_batch.downstream.classify import check_model
    from galaxalign_batch.model.spec import model_identity, parse_model_spec

    if not model:
        m = store.attrs.get("model") or {}
        raise ConfigError(f"--{need} needs --model: the model the store was embedded with ({m.get('kind')} "
                          f"{m.get('name')}, id {m.get('id')}) encodes the {need} into the store's embedding space")
    spec = parse_model_spec(model)
    if spec.kind == "checkpoint":
        from galaxalign_batch.model.checkpoint import read_info

        info = read_info(spec.name)
        check_model(store, model_identity(spec, info))
        mode = info.get("mode")
        if mode == "image-only":
            raise _refuse(model, f"an image-only checkpoint has no {need} tower aligned with its images (it trained a "
                                 "linear head): --text and --symbol need a trimodal or image-text checkpoint; "
                                 "search it with --object, --near or --image")
        return _checkpoint_towers(spec.name, info, device)
    if spec.kind == "open_clip" and spec.random_weights:
        raise _refuse(model, "an open_clip model needs its weights (NAME:TAG or NAME:/path/to/weights)")
    check_model(store, model_identity(spec))
    return _open_clip_towers(spec, device)


def _checkpoint_towers(path: str, info: dict, device: str) -> Towers:
    from galaxalign_batch.model.checkpoint import load_checkpoint
    from galaxalign_batch.model.spec import model_identity, parse_model_spec

    m = load_checkpoint(path, device=device)
    size = int(m.symbols.settings.size) if m.symbols is not None else int(m.image_size)
    note = ""
    if m.symbol_encoder is None:
        note = ("symbols through the image tower: this checkpoint has no symbol encoder of its own"
                + (" (an image-text checkpoint never trained on symbols)" if m.mode == "image-text" else
                   " (tri-modal stage 1)"))

    def text(texts: list[str]) -> np.ndarray:
        return m.encode_text(list(texts)).cpu().numpy().astype(np.float32)

    def symbols(pixels: np.ndarray) -> np.ndarray:
        return m.encode_symbols(np.ascontiguousarray(pixels, dtype=np.float32)).cpu().numpy().astype(np.float32)

    ident = model_identity(parse_model_spec(path), info)
    return Towers(ident, f"{m.mode} checkpoint {ident['name']}", size, text, symbols, note)


def _open_clip_towers(spec, device: str) -> Towers:
    import torch
    import torch.nn.functional as F

    from galaxalign_batch.model.config import create_clip, tokenizer_for
    from galaxalign_batch.model.inputs import prepare_images
    from galaxalign_batch.model.spec import TINY_SEED, model_identity

    if spec.kind == "tiny":
        torch.manual_seed(TINY_SEED)
        log.warning("--model tiny: RANDOM weights; text and symbol queries are meaningless beyond smoke tests")
    clip, cfg, pre = create_clip(spec.name, spec.weights)
    clip = clip.to(device).eval()
    tok = tokenizer_for(spec.name, cfg)
    size = int(pre["size"])
    mean = torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def text(texts: list[str]) -> np.ndarray:
        return clip.encode_text(tok(list(texts)).to(device), normalize=True).float().cpu().numpy()

    @torch.no_grad()
    def symbols(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(device)
        return F.normalize(clip.encode_image(prepare_images(x, size, mean, std)), dim=-1).float().cpu().numpy()

    ident = model_identity(spec)
    return Towers(ident, f"open_clip {ident['name']}", size, text, symbols,
                  "symbols through the image tower: an open_clip model never learnt symbols")


def read_sketch(path: str | os.PathLike, size: int) -> np.ndarray:
    """A user's drawing as the model's symbols are given: ``(3, size, size)`` float32 in [0, 1], bright on dark.

    Read as RGB (an alpha channel is composited on white, as a drawing program shows it); a drawing
    whose border is mostly light (dark lines on paper or a white canvas) is inverted, since the
    model's symbols are light shapes on black; then resized like a user symbol folder's images
    (``model.symbols``: to twice the symbol size, then to the symbol size, bilinear).
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QueryError(f"{path}: symbol file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(bg, rgba).convert("RGB")
            else:
                rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise QueryError(f"{path}: not an image ({' '.join(str(e).split())})") from None
    a = np.asarray(rgb, dtype=np.uint8)
    if a.shape[0] < 4 or a.shape[1] < 4:
        raise QueryError(f"{path}: a drawing of {a.shape[1]}x{a.shape[0]} pixels is too small")
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).astype(np.float32).mean(axis=1)
    if np.median(border) > 127.5:
        a = 255 - a
    # as model.symbols reads a user symbol (_load_rgb at twice the size) and renders it canonically
    two = Image.fromarray(a).resize((2 * size, 2 * size), Image.Resampling.BILINEAR)
    one = two.resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(one, dtype=np.float32).transpose(2, 0, 1) / 255.0).astype(np.float32)
