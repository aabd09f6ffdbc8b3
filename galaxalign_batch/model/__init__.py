"""The GalaxAlign model: open_clip encoders for images, symbols and text; training; evaluation; checkpoints.

Public API (imported lazily, so ``import galaxalign_batch.model`` stays light):

- :func:`load_checkpoint` (path) -> :class:`GalaxAlignModel` with ``encode_images``,
  ``encode_text``, ``encode_symbols``, ``class_prototypes`` and ``classify``; :func:`read_info`.
- :class:`TrainConfig` (``galaxalign_batch.model.launch.train(cfg)`` runs it, locally or with Ray Train),
  :func:`evaluate_checkpoints`.
- :class:`SymbolSet`, :func:`draw_symbol`; :func:`load_dataset`.
- :func:`parse_model_spec` (the ``--model`` grammar of every command) -> :class:`ModelSpec`;
  :func:`model_identity` (what a store records of its model).

See docs/model.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GalaxAlignModel": "galaxalign_batch.model.galaxalign",
    "load_checkpoint": "galaxalign_batch.model.checkpoint",
    "save_model": "galaxalign_batch.model.checkpoint",
    "read_info": "galaxalign_batch.model.checkpoint",
    "TrainConfig": "galaxalign_batch.model.train",
    "evaluate_checkpoints": "galaxalign_batch.model.evaluate",
    "evaluate_model": "galaxalign_batch.model.evaluate",
    "SymbolSet": "galaxalign_batch.model.symbols",
    "draw_symbol": "galaxalign_batch.model.symbols",
    "load_dataset": "galaxalign_batch.model.data",
    "TINY": "galaxalign_batch.model.config",
    "ModelSpec": "galaxalign_batch.model.spec",
    "parse_model_spec": "galaxalign_batch.model.spec",
    "model_identity": "galaxalign_batch.model.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'galaxalign_batch.model' has no attribute {name!r}")
