"""Positions and angles on the sky: unit vectors of ICRS positions, chord <-> angle, angles written by people.

Used by positional matching (``join``) and cone search (``search``); cross-cutting, like
:mod:`galaxalign_batch.vocabulary`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["parse_angle_arcsec", "radec_to_xyz", "chord_from_arcsec", "arcsec_from_chord", "viewer_url", "VIEWER"]

#: The Legacy Survey sky viewer: a link per source in search tables and reports.
VIEWER = "https://www.legacysurvey.org/viewer"


def parse_angle_arcsec(text: str | float, what: str = "radius") -> float:
    """An angle such as ``1arcsec``, ``0.5 arcmin``, ``2e-4 deg`` or a bare number (arcsec) -> arcsec."""
    import astropy.units as u

    from galaxalign_batch.errors import ConfigError

    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s)
        except ValueError:
            try:
                q = u.Quantity(s)
                value = float(q.to_value(u.arcsec))
            except (TypeError, ValueError, u.UnitsError):
                raise ConfigError(f"{what} {text!r}: expected an angle such as 1arcsec, 0.5arcmin or 0.001deg") from None
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive angle, got {text!r}")
    return value


def radec_to_xyz(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (N, 3) of ICRS positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def chord_from_arcsec(arcsec: float | np.ndarray) -> np.ndarray | float:
    """The straight-line distance between two unit vectors ``arcsec`` apart (for KD-trees on unit vectors)."""
    return 2.0 * np.sin(np.radians(np.asarray(arcsec, dtype=np.float64) / 3600.0) / 2.0)


def arcsec_from_chord(chord: np.ndarray | float) -> np.ndarray | float:
    """The angle in arcsec between two unit vectors ``chord`` apart (inverse of :func:`chord_from_arcsec`)."""
    return np.degrees(2.0 * np.arcsin(np.clip(np.asarray(chord, dtype=np.float64) / 2.0, 0.0, 1.0))) * 3600.0


def viewer_url(ra: float, dec: float, *, layer: str = "ls-dr10", zoom: int = 16) -> str:
    """The Legacy Survey viewer centred on (ra, dec) in degrees: ``VIEWER?ra=...&dec=...&layer=...&zoom=...``."""
    return f"{VIEWER}?ra={float(ra) % 360.0:.6f}&dec={float(dec):.6f}&layer={layer}&zoom={int(zoom)}"
