"""Batched cutouts at fixed angular size: resampling, masks and the Legacy Survey viewer / asinh stretch (Numba).

See docs/preprocess.md. Public API: :class:`CutoutSpec`, :func:`make_cutouts`, :class:`CutoutBatch`,
:func:`warmup`.
"""

from galaxalign_batch.preprocess.spec import CutoutSpec


def __getattr__(name: str):
    """The Numba kernels load on first use (PEP 562): a driver that only reads a spec does not import Numba."""
    if name in ("CutoutBatch", "make_cutouts", "warmup"):
        from galaxalign_batch.preprocess import cutouts

        value = getattr(cutouts, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CutoutSpec", "CutoutBatch", "make_cutouts", "warmup"]
