"""The embedding engine: tiles -> sources -> cutouts -> embeddings -> store, distributed with Ray."""

from galaxalign_batch.engine.tiles import TileRef, resolve_tiles
from galaxalign_batch.engine.pipeline import EmbedSummary, embed_tiles

__all__ = ["TileRef", "resolve_tiles", "EmbedSummary", "embed_tiles"]
