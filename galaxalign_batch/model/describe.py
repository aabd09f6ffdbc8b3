"""What a model file is, in a few lines: ``galaxalign-batch info MODEL``.

A GalaxAlign checkpoint (``train``, ``pretrain``, ``pretrain --expand``) or a compact foundation file
(``pretrain --export``, the shipped ``foundation-tiny.safetensors``) describes itself in its header;
:func:`describe` reads that description (no weights) and :func:`summary` turns it into the lines a
user asks for: what made the model, its architecture, the cutouts it reads (size, stretch, and the other
stretches it or its foundation saw), its classes and symbols, what it was trained on, which model it
started from (``lineage``, oldest first) and which weights it holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from galaxalign_batch.errors import ConfigError

__all__ = ["describe", "summary"]


def describe(path: str | os.PathLike) -> dict:
    """``{"path", "bytes", "kind", "description"}`` of a checkpoint (file or folder) or a compact
    foundation; ``kind`` is ``"checkpoint"`` or ``"compact foundation"``."""
    from galaxalign_batch.model.checkpoint import COMPACT_KEY, META_KEY, read_info
    from galaxalign_batch.model.files import description_keys
    from galaxalign_batch.model.spec import model_file

    file = model_file(path) if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such model file")
    keys = description_keys(file)
    if META_KEY in keys:
        kind, info = "checkpoint", read_info(file)
    elif COMPACT_KEY in keys:
        from galaxalign_batch.model.pretrain import read_compact

        meta = read_compact(file)
        kind, info = "compact foundation", dict(meta["info"], weights_digest=meta.get("weights_digest"))
    else:
        raise ConfigError(f"{file}: not a GalaxAlign model file")
    return {"path": str(file), "bytes": file.stat().st_size, "kind": kind, "description": info}


def _epochs(training: dict) -> str:
    align = int(training.get("align_epochs") or 0)
    if training.get("mode") == "trimodal" and training.get("epochs") is None:
        parts = [f"stage 1 {training.get('epochs_stage1')}", f"stage 2 {training.get('epochs_stage2')}"]
    else:  # a baseline runs --epochs, by default as many as both tri-modal stages
        n = training.get("epochs")
        parts = [str(n if n is not None else (training.get("epochs_stage1") or 0) + (training.get("epochs_stage2") or 0))]
    if align:
        parts.insert(0, f"align {align}")
    return " + ".join(parts) + " epoch(s)"


def _stretches(info: dict) -> str:
    from galaxalign_batch.model.checkpoint import foundation_stretches, trained_stretches

    own = (info.get("cutout_spec") or {}).get("stretch")
    also = [s for s in trained_stretches(info) if s != own]
    earlier = [s for s in foundation_stretches(info) if s != own and s not in also]
    text = f"stretch {own}"
    if also and info.get("pretraining"):
        text += f", also saw {', '.join(also)} (pretrain --stretch-augment)"
    elif also:
        text += f", also trained on {', '.join(also)} (train --stretch-augment)"
    if earlier:
        text += f"; its foundation also saw {', '.join(earlier)} (without labels)"
    return text


def _ancestor(entry: dict) -> str:
    what = {"pretrain": "a foundation made by pretrain", "train": "a model made by train"}.get(
        entry.get("made_by"), "a checkpoint")
    where = entry.get("path")
    if entry.get("expanded_from"):
        where += f" (expanded from {entry['expanded_from']})"
    bits = [f"{what}: {where}", f"weights {entry.get('weights_digest')}"]
    if entry.get("sources"):
        bits.append(f"{entry['sources']} sources of {entry.get('tiles')} tile(s), {entry.get('steps')} steps")
    if entry.get("data"):
        bits.append(f"data {entry['data']}")
    if entry.get("stretches"):
        bits.append(f"stretch {', '.join(entry['stretches'])}")
    return "; ".join(bits)


def summary(d: dict) -> list[tuple[str, str]]:
    """``(label, text)`` lines of :func:`describe`'s result, for a terminal."""
    info = d["description"]
    oc = info.get("open_clip") or {}
    cfg = oc.get("config") or {}
    vision = cfg.get("vision_cfg") or {}
    spec = info.get("cutout_spec") or {}
    pre = info.get("pretraining") or {}
    training = info.get("training") or {}
    made = "pretrain" if pre else "train" if training else "?"
    stage = info.get("stage") or ""
    stage = f", {stage.replace('stage', 'stage ')}" if stage.startswith("stage") else ""
    lines = []
    if d["kind"] == "compact foundation":
        lines.append(("kind", "compact foundation file (float16; train/embed take it after "
                              "`galaxalign-batch pretrain --expand FILE --out DIR`)"))
    else:
        what = "label-free foundation" if pre else "GalaxAlign model"
        expanded = f" (expanded from {info['expanded_from']})" if info.get("expanded_from") else ""
        lines.append(("kind", f"{what}, mode {info.get('mode')}{stage}, made by `{made}`{expanded}"))
    arch = oc.get("name", "?")
    if oc.get("pretrained"):
        arch += f" from {oc['pretrained']}"
    dims = [f"{cfg['embed_dim']}-d embeddings" if cfg.get("embed_dim") else None,
            f"{vision['image_size']} px images" if vision.get("image_size") else None,
            f"vision {vision['layers']} layers x {vision['width']}" if vision.get("layers") else None]
    lines.append(("architecture", ", ".join([arch, *filter(None, dims)])))
    if spec:
        lines.append(("cutouts", f"{spec.get('angular_size')}\" -> {spec.get('out_size')} px, {spec.get('orientation', '?')}, "
                                 + _stretches(info)))
    vocab = info.get("vocabulary") or {}
    classes = [c.get("key") for c in vocab.get("classes") or ()]
    if classes:
        lines.append(("classes", f"{len(classes)} ({vocab.get('name')}): {', '.join(classes)}"))
    symbols = info.get("symbols") or {}
    if symbols and info.get("mode") == "trimodal":
        text = "built-in drawings" if not symbols.get("user_count") else (
            f"{symbols['user_count']} image(s) from {symbols.get('user_source')}"
            + (f" + built-in drawings for {', '.join(symbols['drawn'])}" if symbols.get("drawn") else ""))
        lines.append(("symbols", text + (", own symbol encoder" if info.get("has_symbol_encoder") else "")))
    if info.get("classifier_classes"):
        lines.append(("head", f"linear classifier over {info['classifier_classes']} classes"))
    if pre:
        c = pre.get("config") or {}
        lines.append(("pretrained on", f"{pre.get('sources')} sources of {pre.get('tiles')} tile(s), no labels; "
                                       f"{pre.get('global_step')} steps, batch {c.get('batch_size')}, seed {c.get('seed')}"))
    if training:
        data = info.get("data") or {}
        bits = [f"{data.get('kind', 'data')} {data.get('path') or training.get('data')}", _epochs(training),
                f"batch {training.get('batch_size')}", f"seed {training.get('seed')}"]
        if data.get("limit_per_class"):
            bits.append(f"{data['limit_per_class']} labels per class")
        if training.get("withhold_classes"):
            bits.append(f"withheld {', '.join(training['withhold_classes'])}")
        if info.get("train_seconds") is not None:
            bits.append(f"{float(info['train_seconds']):.0f} s")
        lines.append(("trained on", "; ".join(bits)))
    lineage = info.get("lineage") or []
    if lineage:
        for i, entry in enumerate(lineage):
            lines.append(("started from" if i == len(lineage) - 1 else "  earlier", _ancestor(entry)))
    elif oc.get("initialised_from"):
        lines.append(("started from", f"{oc['initialised_from']} (recorded before lineage was kept)"))
    else:
        lines.append(("started from", f"{oc.get('name')} with " + (
            f"weights {oc['pretrained']}" if oc.get("pretrained") else "random weights")))
    size = d["bytes"] / 1e6
    digest = ("exported from weights " if d["kind"] == "compact foundation" else "digest ") + str(info.get("weights_digest"))
    lines.append(("weights", f"{digest}, {size:.1f} MB, saved {info.get('saved', '?')}, "
                             f"galaxalign-batch {info.get('code_version', '?')}"))
    return lines
