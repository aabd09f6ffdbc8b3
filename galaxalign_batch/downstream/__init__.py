"""Downstream use of an embedding store: classify, search, join, report (see docs/downstream.md).

Public API (imported lazily, so ``import galaxalign_batch.downstream`` stays light):

- :func:`classify_store` (store, :class:`Scorer`) with :func:`scorer_from_checkpoint`;
- :func:`run_query` + :func:`search_store` (exact or faiss index), :func:`plot_grid`;
  :func:`build_index` / :func:`get_index`;
- :func:`join_catalog` (positional or key join to Parquet), :func:`match_positions`, :func:`read_catalog`;
  :func:`join_partitioned` (HEALPix partitions, streamed catalogue, local threads or Ray tasks) and
  :func:`read_partitioned`;
- :func:`write_report` (self-contained HTML);
- errors: :class:`QueryError`, :class:`CatalogError`, :class:`ModelMismatchError`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "classify_store": "galaxalign_batch.downstream.classify",
    "scorer_from_checkpoint": "galaxalign_batch.downstream.classify",
    "Scorer": "galaxalign_batch.downstream.classify",
    "run_query": "galaxalign_batch.downstream.search",
    "search_store": "galaxalign_batch.downstream.search",
    "plot_grid": "galaxalign_batch.downstream.search",
    "build_index": "galaxalign_batch.downstream.index",
    "get_index": "galaxalign_batch.downstream.index",
    "join_catalog": "galaxalign_batch.downstream.join",
    "match_positions": "galaxalign_batch.downstream.join",
    "join_partitioned": "galaxalign_batch.downstream.partitioned",
    "read_partitioned": "galaxalign_batch.downstream.partitioned",
    "read_catalog": "galaxalign_batch.downstream.catalogs",
    "write_report": "galaxalign_batch.downstream.report",
    "classification_of": "galaxalign_batch.downstream.common",
    "QueryError": "galaxalign_batch.downstream.common",
    "CatalogError": "galaxalign_batch.downstream.common",
    "ModelMismatchError": "galaxalign_batch.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'galaxalign_batch.downstream' has no attribute {name!r}")
