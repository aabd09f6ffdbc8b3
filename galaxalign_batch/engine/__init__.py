"""The embedding engine: tiles -> sources -> cutouts -> embeddings -> store, distributed with Ray.

Tiles come from :func:`galaxalign_batch.survey.tiles.resolve_tiles`.
"""

from galaxalign_batch.engine.pipeline import EmbedSummary, embed_tiles

__all__ = ["EmbedSummary", "embed_tiles"]
