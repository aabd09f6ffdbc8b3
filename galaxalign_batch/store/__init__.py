"""The Zarr v3 embedding store (layout and write protocol in docs/store.md)."""

from galaxalign_batch.store.embedding_store import (EmbeddingStore, StoreCorruptError, StoreError, open_store,
                                                    store_exists)
from galaxalign_batch.store import schema
from galaxalign_batch.store.lock import LockError

__all__ = ["EmbeddingStore", "StoreError", "StoreCorruptError", "LockError", "open_store", "store_exists", "schema"]
