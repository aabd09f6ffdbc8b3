"""The Zarr v3 embedding store (layout in docs/store.md)."""

from galaxalign_batch.store.embedding_store import EmbeddingStore, StoreError, open_store, store_exists
from galaxalign_batch.store import schema

__all__ = ["EmbeddingStore", "StoreError", "open_store", "store_exists", "schema"]
