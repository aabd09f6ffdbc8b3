"""Human-in-the-loop labelling of an embedding store in the browser (``galaxalign-batch label``).

- :mod:`.db`: the durable label store (SQLite, WAL, history with undo);
- :mod:`.queue`: what to show next (k-means first round, then uncertainty sampling with diversity);
- :mod:`.trainer`: background retraining of a few-shot head every few labels;
- :mod:`.server`: the HTTP server, JSON API and the static page in ``static/``;
- :mod:`.task`: file locations of a task and :func:`build_app`.

See docs/labelling.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LabelDB": "galaxalign_batch.labelling.db",
    "ActiveQueue": "galaxalign_batch.labelling.queue",
    "Clusters": "galaxalign_batch.labelling.queue",
    "IdIndex": "galaxalign_batch.labelling.queue",
    "Trainer": "galaxalign_batch.labelling.trainer",
    "LabelApp": "galaxalign_batch.labelling.server",
    "make_server": "galaxalign_batch.labelling.server",
    "serve": "galaxalign_batch.labelling.server",
    "build_app": "galaxalign_batch.labelling.task",
    "TaskPaths": "galaxalign_batch.labelling.task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'galaxalign_batch.labelling' has no attribute {name!r}")
