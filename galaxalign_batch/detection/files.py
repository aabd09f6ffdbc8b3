"""The detector file: one ``.safetensors`` (``model/files.py`` conventions) for the detection head (with
its frozen encoder's image tower as ``encoder.visual.*``) or the Faster R-CNN baseline, and a JSON
description under ``galaxalign_detector``: ``format``, ``format_version``, ``kind`` (``centernet`` or
``faster-rcnn``), ``config``, ``encoder`` (the foundation's open_clip configuration, preprocessing,
cutout spec, source and ``weights_digest`` of its image tower; None for the R-CNN), ``training``
(what it was trained on and how), ``saved``, ``code_version``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path

import torch

from galaxalign_batch._version import __version__
from galaxalign_batch.detection.head import DetectionHead, DetectorConfig
from galaxalign_batch.detection.rcnn import RCNNConfig, RCNNDetector
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.tokens import FoundationEncoder

FORMAT = "galaxalign-detector"
FORMAT_VERSION = 1
META_KEY = "galaxalign_detector"


def save_detector(model: DetectionHead | RCNNDetector, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write a detector (head or R-CNN) atomically; ``extra`` joins the description (e.g. ``training``)."""
    from galaxalign_batch.model.files import write_weights

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = dataclasses.asdict(model.config)
    if isinstance(model, RCNNDetector):
        kind, encoder = "faster-rcnn", None
        cfg["anchor_sizes"] = list(cfg["anchor_sizes"])
    else:
        kind, encoder = "centernet", (model.encoder.describe() if model.encoder is not None else None)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "code_version": __version__, "kind": kind,
            "config": cfg, "encoder": encoder,
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    return write_weights(path, state, META_KEY, meta)


def read_detector_info(path: str | os.PathLike) -> dict:
    """The JSON description of a saved detector (no weights read)."""
    from galaxalign_batch.model.files import read_description

    return read_description(path, META_KEY, FORMAT, FORMAT_VERSION, "detector")


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> DetectionHead | RCNNDetector:
    """The :class:`DetectionHead` or :class:`RCNNDetector` saved at ``path`` (eval mode)."""
    from galaxalign_batch.model.files import read_weights

    info = read_detector_info(path)
    state = read_weights(path)
    try:
        if info.get("kind") == "faster-rcnn":
            model = RCNNDetector(RCNNConfig(**{**info["config"], "anchor_sizes": tuple(info["config"]["anchor_sizes"])}))
        else:
            encoder = None
            if info.get("encoder"):
                enc = {k[len("encoder.visual."):]: v for k, v in state.items() if k.startswith("encoder.visual.")}
                encoder = FoundationEncoder.from_description(info["encoder"], enc)
            model = DetectionHead(DetectorConfig(**info["config"]), encoder)
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{path}: bad detector description ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the described detector "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
