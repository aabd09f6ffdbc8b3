"""open_clip model configs of this project, and building an open_clip model from a name or a config.

Importing this module registers ``galaxalign-tiny`` (``configs/galaxalign-tiny.json``: a ViT of
width 128, 4 layers, patch 8 on 64 x 64 images, and a 4-layer text transformer of width 128 with
open_clip's BPE tokenizer; 8 M parameters, mostly the token embedding) with
``open_clip.add_model_config``, so ``open_clip.create_model("galaxalign-tiny")`` works.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import open_clip
import torch

from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
TINY = "galaxalign-tiny"
_registered = False


def register_configs() -> None:
    """Add this package's model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


register_configs()


def model_config(name: str) -> dict:
    """The open_clip config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a registered model name."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model {name!r}; e.g. {TINY}, ViT-B-16, ViT-B-32 "
                          f"(galaxalign-batch train --help lists where to look)")
    return copy.deepcopy(cfg)


def create_clip(name: str, pretrained: str | None = None) -> tuple[torch.nn.Module, dict, dict]:
    """An open_clip model by name with weights from a pretrained tag or a local weights file.

    Returns ``(model, model_cfg, preprocess_cfg)``. Nothing is downloaded when ``pretrained`` is a
    file; a tag needs open_clip's cache (or the network) and fails with a ConfigError otherwise.
    """
    cfg = model_config(name)
    if pretrained and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ConfigError(f"--pretrained {pretrained!r} is neither a file nor a pretrained tag of {name} "
                              f"(tags: {', '.join(tags) or 'none'})")
    try:
        with quiet_open_clip():
            model = open_clip.create_model(name, pretrained=pretrained or None, weights_only=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"cannot create open_clip model {name!r} with weights {pretrained!r}: "
                          f"{' '.join(str(e).split())[:300]}") from None
    log.info("open_clip %s with %s", name, f"weights {pretrained}" if pretrained else "random weights")
    preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return model, cfg, _plain_preprocess(preprocess, cfg)


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip logs every step of model creation on the root logger at INFO: keep only its errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def build_clip_from_config(cfg: dict) -> torch.nn.Module:
    """An open_clip CLIP / CustomTextCLIP with random weights from a stored config dict (no registry needed)."""
    cfg = copy.deepcopy(cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise ConfigError("CoCa models are not supported by GalaxAlign")
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def tokenizer_for(name: str, cfg: dict):
    """open_clip's tokenizer of a model, from its name when registered, else from its config's text_cfg."""
    text_cfg = cfg.get("text_cfg", {})
    if open_clip.get_model_config(name) is not None:
        with quiet_open_clip():
            return open_clip.get_tokenizer(name)
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def _plain_preprocess(preprocess: dict, cfg: dict) -> dict:
    """Just the parts of open_clip's preprocess config the model needs: size, mean, std (JSON-able)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = cfg["vision_cfg"].get("image_size", 224)
    size = preprocess.get("size", size)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"non-square model input {size} is not supported")
        size = size[0]
    return {"size": int(size), "mean": [float(v) for v in preprocess.get("mean", OPENAI_DATASET_MEAN)],
            "std": [float(v) for v in preprocess.get("std", OPENAI_DATASET_STD)]}
