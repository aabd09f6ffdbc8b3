"""Batched cutouts at fixed angular size: resampling, masks and the Legacy Survey viewer / asinh stretch (Numba).

See docs/preprocess.md. Public API: :class:`CutoutSpec`, :func:`make_cutouts`, :class:`CutoutBatch`,
:func:`warmup`.
"""

from galaxalign_batch.preprocess.cutouts import CutoutBatch, make_cutouts, warmup
from galaxalign_batch.preprocess.spec import CutoutSpec

__all__ = ["CutoutSpec", "CutoutBatch", "make_cutouts", "warmup"]
