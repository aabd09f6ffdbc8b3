"""The Zarr v3 embedding store (layout, write protocol and reading in docs/store.md).

Public API: :func:`open_store` / :class:`EmbeddingStore` (create, commit, and the read API:
``read``, ``read_embeddings``, ``read_columns``, ``iter_chunks``, ``embeddings``, ``columns``,
``cutouts``), :func:`open_readable`, :class:`DerivedWriter` (every command that writes a derived
result into a store), and the errors. Nothing outside this package touches the Zarr group.
"""

from galaxalign_batch.store.embedding_store import (EmbeddingStore, StoreCorruptError, StoreError, open_readable, open_store,
                                                    store_exists)
from galaxalign_batch.store import schema
from galaxalign_batch.store.derived import (DerivedArray, DerivedWriter, ModelMismatchError, count_lines,
                                            label_counts, probability_arrays, probability_columns)
from galaxalign_batch.lease import LockError
from galaxalign_batch.store.reading import EmbeddingView

__all__ = ["EmbeddingStore", "StoreError", "StoreCorruptError", "ModelMismatchError", "LockError", "open_store",
           "open_readable", "store_exists", "schema", "EmbeddingView", "DerivedWriter", "DerivedArray",
           "probability_arrays", "probability_columns", "label_counts", "count_lines"]
