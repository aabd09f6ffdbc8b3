"""Model specs: the one grammar of ``--model`` in every command, and the identity a store records.

A model is named by one string (``train``, ``pretrain``, ``embed``, ``classify``, ``search``,
``fewshot``...):

========================================  ===========  ===========================================
form                                      kind         what it is
========================================  ===========  ===========================================
``runs/train/model.safetensors``, or the  checkpoint   one of our checkpoints (``train``,
folder holding ``model.safetensors``                   ``pretrain``, ``pretrain --expand``)
``NAME:TAG``, ``NAME:/path/weights``      open_clip    an open_clip model with a pretrained tag
                                                       (needs open_clip's cache; nothing is
                                                       downloaded) or a local weights file
``NAME``                                  open_clip    an open_clip model with *random* weights
                                                       (``train``, ``pretrain``: a start from
                                                       scratch; ``embed`` refuses it)
``tiny``                                  tiny         ``galaxalign-tiny`` with seeded random
                                                       weights: smoke tests only, warned
========================================  ===========  ===========================================

``train --model NAME --pretrained TAG`` is the same as ``--model NAME:TAG``.

:func:`model_identity` is what a store records as its ``model`` attribute and what ``classify``,
``search`` and ``fewshot`` compare against; it is computed here only, from a checkpoint's header
(read by hand: no torch, so that a run with nothing to do finishes at once) or the open_clip name
and a digest of the weights file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from galaxalign_batch.errors import ConfigError

__all__ = ["ModelSpec", "parse_model_spec", "model_identity", "model_file", "file_digest", "TINY", "TINY_SEED"]

TINY = "galaxalign-tiny"
TINY_SEED = 0
MODEL_FILE = "model.safetensors"
KINDS = ("checkpoint", "open_clip", "tiny")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value.

    Attributes
    ----------
    kind : str
        ``"checkpoint"``, ``"open_clip"`` or ``"tiny"``.
    name : str
        The checkpoint's path as given, or the open_clip model name.
    weights : str or None
        An open_clip pretrained tag or weights file; None for random weights (and for checkpoints).
    text : str
        The value as the user gave it.
    """

    kind: str
    name: str
    weights: str | None
    text: str

    @property
    def random_weights(self) -> bool:
        return self.kind != "checkpoint" and not self.weights

    @property
    def path(self) -> Path:
        """The checkpoint's model file (``kind == "checkpoint"`` only)."""
        if self.kind != "checkpoint":
            raise ConfigError(f"model {self.text!r} is an open_clip model, not a checkpoint file")
        return model_file(self.name)


def is_checkpoint(text: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` file or a folder holding ``model.safetensors`` (existing or not for a file)."""
    text = os.fspath(text)
    return text.endswith(".safetensors") or (os.path.isdir(text) and os.path.isfile(os.path.join(text, MODEL_FILE)))


def parse_model_spec(text: str | os.PathLike, *, pretrained: str | None = None) -> ModelSpec:
    """Parse a ``--model`` value (module docstring); ``pretrained`` is ``train --pretrained``.

    Raises :class:`~galaxalign_batch.errors.ConfigError` for a folder that is no checkpoint, or a
    pretrained tag given twice.
    """
    text = os.fspath(text).strip()
    if not text:
        raise ConfigError("model: empty model name")
    if is_checkpoint(text):
        if pretrained:
            raise ConfigError(f"model {text!r} is a checkpoint of ours: pretrained={pretrained!r} does not apply")
        return ModelSpec("checkpoint", text, None, text)
    if os.path.isdir(text):
        raise ConfigError(f"model {text!r}: a folder without {MODEL_FILE} (not a checkpoint of ours)")
    if text == "tiny":
        if pretrained:
            raise ConfigError("model 'tiny' has random weights: pretrained does not apply (use galaxalign-tiny:FILE)")
        return ModelSpec("tiny", TINY, None, text)
    name, sep, weights = text.partition(":")
    if sep and len(name) == 1 and os.path.isabs(text):  # a Windows drive letter is not NAME:TAG
        name, weights = text, ""
    if sep and not weights:
        raise ConfigError(f"model {text!r}: expected NAME:TAG or NAME:/path/to/weights after the colon")
    if weights and pretrained:
        raise ConfigError(f"model {text!r} names its weights already; pretrained={pretrained!r} is a second source")
    return ModelSpec("open_clip", name, weights or pretrained or None, text)


def model_file(path: str | os.PathLike) -> Path:
    """The model file of a checkpoint given as the file or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    return path


def read_header_info(path: str | os.PathLike) -> dict | None:
    """A checkpoint's GalaxAlign description from its safetensors header, parsed by hand (no torch);
    None when the file is not one of ours or cannot be read."""
    try:
        with open(model_file(path), "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if not 0 < n < (1 << 28):
                return None
            header = json.loads(fh.read(n))
        info = json.loads(header["__metadata__"]["galaxalign"])
    except (OSError, ValueError, KeyError, TypeError, struct.error, ConfigError):
        return None
    return info if isinstance(info, dict) else None


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of a file (a checkpoint folder: its model file)."""
    h = hashlib.sha256()
    with open(model_file(path) if Path(path).is_dir() else path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_identity(spec: ModelSpec | str, info: dict | None = None) -> dict | None:
    """``{"kind", "name", "id"[, "mode"]}``: what a store records of its model, and compares.

    A checkpoint's id is its ``weights_digest`` (written by ``train``), else the digest of its model
    file; an open_clip model's is the digest of its weights file, or of ``NAME:TAG``; ``tiny``'s is
    its seed. ``info`` is the checkpoint's description when the caller has read it already; None is
    returned when a checkpoint's header cannot be read (the caller reads it with torch, which says why).
    """
    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec)
    if spec.kind == "checkpoint":
        info = info if info is not None else read_header_info(spec.name)
        if info is None:
            return None
        return {"kind": "checkpoint", "name": os.path.basename(os.path.normpath(spec.name)),
                "id": info.get("weights_digest") or file_digest(spec.name), "mode": info.get("mode")}
    if spec.kind == "tiny":
        ident = f"tiny-seed{TINY_SEED}"
    elif spec.weights and os.path.isfile(spec.weights):
        ident = file_digest(spec.weights)
    else:
        ident = hashlib.sha256(f"{spec.name}:{spec.weights}".encode()).hexdigest()[:16]
    return {"kind": spec.kind, "name": f"{spec.name}:{spec.weights}" if spec.weights else spec.name, "id": ident}
