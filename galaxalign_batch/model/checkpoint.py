"""Self-describing checkpoints: safetensors weights + a JSON description, never unpickled objects.

A model file (``model.safetensors``) holds every weight of a :class:`GalaxAlignModel` and, in the
safetensors metadata under ``galaxalign``, the model's ``info`` (open_clip name and config, input
size / mean / std, mode, vocabulary, symbol settings, CutoutSpec, training settings, code
version). User symbol images travel with it as uint8 tensors, so class prototypes can be rebuilt
from the file alone. Training state (optimizer, scheduler, epoch) is a separate ``train_state.pt``
of plain tensors and numbers, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch

from galaxalign_batch import atomic
from galaxalign_batch._version import __version__
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.config import build_clip_from_config, tokenizer_for
from galaxalign_batch.model.files import has_checksum, read_description, read_weights, write_weights
from galaxalign_batch.model.galaxalign import GalaxAlignModel
from galaxalign_batch.model.symbols import SymbolSet
from galaxalign_batch.model.spec import MODEL_FILE, model_file
from galaxalign_batch.vocabulary import Vocabulary

FORMAT = "galaxalign-model"
META_KEY = "galaxalign"  # the header key of the description
COMPACT_KEY = "galaxalign_compact"  # ... and of a compact foundation's (model.pretrain.export_foundation)
FORMAT_VERSION = 1

STATE_FILE = "train_state.pt"
PARTIAL_DIR = ".partial"  # the suffix of a checkpoint folder being written (renamed into place when whole)
PROGRESS_FILE = "progress.json"
_USER_IMAGES = "__symbols__.user_images"
_USER_LABELS = "__symbols__.user_labels"
log = logging.getLogger(__name__)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_model(model: GalaxAlignModel, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically; returns the path."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = dict(model.info)
    info.update(format=FORMAT, format_version=FORMAT_VERSION, code_version=__version__,
                open_clip_version=open_clip.__version__, weights_digest=weights_digest(state),
                saved=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                vocabulary=model.vocabulary.to_dict(), vocabulary_digest=model.vocabulary.digest(),
                symbols=model.symbols.to_dict() if model.symbols is not None else None,
                has_symbol_encoder=model.symbol_encoder is not None,
                classifier_classes=model.classifier.out_features if model.classifier is not None else None)
    if model.symbols is not None and model.symbols.user_images is not None:
        state[_USER_IMAGES] = torch.from_numpy(np.ascontiguousarray(model.symbols.user_images))
        state[_USER_LABELS] = torch.from_numpy(np.ascontiguousarray(model.symbols.user_labels))
    write_weights(path, state, META_KEY, info)
    model.info = {k: v for k, v in info.items() if k not in ("saved",)}
    return path


def read_info(path: str | os.PathLike) -> dict:
    """The JSON description stored in a model file (no weights read)."""
    path = _model_path(path)
    try:
        return read_description(path, META_KEY, FORMAT, FORMAT_VERSION, "GalaxAlign checkpoint")
    except ConfigError:
        from galaxalign_batch.model.files import description_keys

        if COMPACT_KEY in description_keys(path):
            raise ConfigError(f"{path}: a compact foundation file: expand it into a checkpoint first, "
                              f"`galaxalign-batch pretrain --expand {path} --out DIR`, then give DIR") from None
        raise


def made_by(info: dict) -> str:
    """Which command made a model description: ``pretrain``, ``train`` or ``""`` (neither recorded)."""
    return "pretrain" if info.get("pretraining") else "train" if info.get("training") else ""


def trained_stretches(info: dict) -> list[str]:
    """Every picture stretch a model's own run saw: its cutout spec's and ``--stretch-augment``'s."""
    run = (info.get("pretraining") or {}).get("config") or info.get("training") or {}
    own = (info.get("cutout_spec") or {}).get("stretch")
    return [s for s in [own, *(run.get("stretch_augment") or [])] if s]


def foundation_stretches(info: dict) -> list[str]:
    """The stretches the foundations in a model's ``lineage`` saw (without labels), each once."""
    return list(dict.fromkeys(s for a in info.get("lineage") or () if a.get("made_by") == "pretrain"
                              for s in a.get("stretches") or ()))


def ancestor(info: dict, path: str | os.PathLike) -> dict:
    """A short record of the model a run started from (``train``/``pretrain --model CHECKPOINT``), kept
    in the new model's ``lineage``: what it was, which file, which weights, what it was trained on."""
    run = info.get("pretraining") or {}
    entry = {"path": str(Path(path).resolve()), "weights_digest": info.get("weights_digest"),
             "made_by": made_by(info), "mode": info.get("mode"), "stretches": trained_stretches(info),
             "saved": info.get("saved")}
    if info.get("expanded_from"):
        entry["expanded_from"] = info["expanded_from"]
    if run:
        entry.update(tiles=run.get("tiles"), sources=run.get("sources"), steps=run.get("global_step"))
    elif info.get("training"):
        entry.update(data=(info.get("data") or {}).get("path") or info["training"].get("data"))
    return entry


def lineage_from(base: dict, path: str | os.PathLike) -> list[dict]:
    """The ``lineage`` of a model started from ``base`` (a checkpoint's description, read from ``path``):
    the base's own lineage, oldest first, then the base."""
    return [*(base.get("lineage") or []), ancestor(base, path)]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> GalaxAlignModel:
    """A :class:`GalaxAlignModel` from a model file (or a checkpoint directory holding ``model.safetensors``)."""
    path = _model_path(path)
    info = read_info(path)
    state = read_weights(path)
    user_images = state.pop(_USER_IMAGES, None)
    user_labels = state.pop(_USER_LABELS, None)
    recorded = info.get("weights_digest")  # read_weights checked the file's checksum; older files have only this
    if recorded and not has_checksum(path) and weights_digest(state) != recorded:
        raise ConfigError(f"{path}: damaged: its weights do not match the digest written with them "
                          f"({recorded}); use another copy or re-create it")
    oc = info["open_clip"]
    clip = build_clip_from_config(oc["config"])
    vocab = Vocabulary.from_dict(info["vocabulary"], str(path))
    symbols = None
    if info.get("symbols"):
        symbols = SymbolSet.from_dict(info["symbols"], None if user_images is None else user_images.numpy(),
                                      None if user_labels is None else user_labels.numpy())
    model = GalaxAlignModel(clip, info, tokenizer_for(oc["name"], oc["config"]), vocab, symbols)
    if info.get("has_symbol_encoder"):
        model.init_symbol_encoder()
    if info.get("classifier_classes"):
        model.add_classifier(int(info["classifier_classes"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the described model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()


def _model_path(path: str | os.PathLike) -> Path:
    return model_file(path)  # the model file of a checkpoint given as the file or its folder


# ---------------------------------------------------------------------------------------------- training state

def save_training_checkpoint(directory: str | os.PathLike, model: GalaxAlignModel, state: dict, progress: dict) -> Path:
    """Write ``model.safetensors``, ``train_state.pt`` and ``progress.json`` into a fresh directory, atomically."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + PARTIAL_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / MODEL_FILE)
    torch.save(state, tmp / STATE_FILE)
    (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` is a renamed-into-place training checkpoint with its three files (not a
    ``*.partial`` folder being written; the files may still be torn: :func:`load_training_state` says)."""
    return (not directory.name.endswith(PARTIAL_DIR) and (directory / MODEL_FILE).is_file()
            and (directory / STATE_FILE).is_file() and (directory / PROGRESS_FILE).is_file())


def prune(root: Path, pattern: str, keep: int) -> None:
    """Remove all but the last ``keep`` (by name) complete checkpoint folders matching ``pattern`` in ``root``."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    done = sorted(p for p in root.glob(pattern) if p.is_dir() and not p.name.endswith(PARTIAL_DIR))
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_training_state(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(train_state, progress) of a training checkpoint directory (weights_only torch.load)."""
    directory = Path(directory)
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        progress = json.loads((directory / PROGRESS_FILE).read_text())
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # a file cut short: empty -> EOFError, one byte -> UnpicklingError, longer -> RuntimeError (zip)
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"{directory}: unreadable training checkpoint ({why})") from None
    return state, progress


def clear_leftovers(out: Path) -> None:
    """Remove the temporary files a killed run left at the top of its output folder ``out`` (a model file
    half-written when it was killed: tens of MB). Safe only under ``out``'s lease (``train``, ``pretrain``):
    no other writer of the folder can be alive."""
    n = atomic.remove_partials(out) if Path(out).is_dir() else 0
    if n:
        log.info("%s: removed %d temporary file(s) of a killed run", out, n)


def load_for_resume(directory: str | os.PathLike) -> tuple[GalaxAlignModel, dict, dict]:
    """(model, train_state, progress) of the checkpoint a run resumes from; a damaged one (a file cut
    short or garbled on disk after it was renamed into place) is one line that says how to go on."""
    try:
        state, progress = load_training_state(directory)
        model = load_checkpoint(directory)
    except ConfigError as e:
        raise ConfigError(f"{e}. It is the newest checkpoint of this run: delete {directory} to resume from "
                          f"the one before it, or start afresh with --no-resume") from None
    return model, state, progress


def find_latest(root: str | os.PathLike) -> Path | None:
    """The complete training checkpoint with the highest epoch anywhere under ``root`` (ours or Ray's)."""
    root = Path(root)
    if not root.is_dir():
        return None
    best, best_key = None, None
    for progress in root.rglob(PROGRESS_FILE):
        d = progress.parent
        if not is_complete(d):
            continue
        try:
            p = json.loads(progress.read_text())
            key = (int(p["epoch"]), int(p.get("global_step", 0)), progress.stat().st_mtime)
        except (OSError, ValueError, KeyError):
            continue
        if best_key is None or key > best_key:
            best, best_key = d, key
    return best
