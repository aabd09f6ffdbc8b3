"""Captions of survey sources from their Tractor catalogue columns, worded as an astronomer would.

Used by label-free pretraining (:mod:`galaxalign_batch.model.pretrain`): each source's image is
paired with a sentence built **only** from columns that real DR9/DR10 Tractor catalogues have:

- ``type`` (PSF, REX, EXP, DEV, SER; DUP is treated as PSF), ``sersic``;
- ``flux_g``, ``flux_r``, ``flux_z`` (nanomaggies; ``mw_transmission_*`` divided out when present)
  -> the r magnitude and the g-r, r-z colours;
- ``shape_r`` (half-light radius, arcsec), ``shape_e1``, ``shape_e2`` -> the axis ratio
  ``q = (1 - |e|) / (1 + |e|)``.

No class label is ever read (the simulator's ``true_class*`` columns are ignored) and no caption
names a morphological class: words such as spiral, bar, merger, disturbed, edge-on, cigar or
smooth never occur (``tests/test_pretrain.py`` checks it). What a caption can say is what the
catalogue measured: colour, brightness, size, elongation and light profile.

Example: ``"a red, round galaxy of r = 17.3, half-light radius 4 arcsec, a de Vaucouleurs profile."``.
Captions fit the tiny model's 32-token context (at most 30 BPE tokens).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: columns a caption may read (besides flux_* / mw_transmission_*); anything else is ignored
CAPTION_COLUMNS = ("type", "sersic", "shape_r", "shape_e1", "shape_e2")

# Words that name (or give away) a Galaxy10 class: captions never contain them.
FORBIDDEN_WORDS = ("spiral", "barred", " bar ", "merg", "disturb", "edge-on", "edge on", "cigar", "smooth",
                   "bulge", "tidal", "interacting", "lenticular", "elliptical")


def _mag(flux: float) -> float | None:
    return 22.5 - 2.5 * math.log10(flux) if flux is not None and np.isfinite(flux) and flux > 0 else None


def _get(row: Mapping, key: str, default=None):
    try:
        v = row[key]
    except (KeyError, IndexError, ValueError):
        return default
    if isinstance(v, (bytes, np.bytes_)):
        v = v.decode("ascii", "replace")
    if isinstance(v, str):
        return v.strip()
    try:
        v = float(v)
    except (TypeError, ValueError):
        return default
    return v if np.isfinite(v) else default


def _flux(row: Mapping, band: str) -> float | None:
    f = _get(row, f"flux_{band}")
    if f is None:
        return None
    t = _get(row, f"mw_transmission_{band}", 1.0) or 1.0
    return f / t if t > 0 else f


def colour_word(g_r: float | None, r_z: float | None) -> str | None:
    """``blue`` / ``green-valley`` / ``red`` / ``very red`` from g-r (r-z when g is missing)."""
    if g_r is not None:
        return "blue" if g_r < 0.5 else "green-valley" if g_r < 0.7 else "red" if g_r < 1.0 else "very red"
    if r_z is not None:
        return "blue" if r_z < 0.3 else "green-valley" if r_z < 0.42 else "red"
    return None


def shape_word(q: float) -> str:
    return "round" if q >= 0.8 else "oval" if q >= 0.55 else "elongated" if q >= 0.35 else "very flattened"


def size_word(r_half: float) -> str | None:
    return "compact" if r_half < 1.5 else None if r_half < 3.0 else "extended" if r_half < 5.0 else "large"


def profile_phrase(kind: str, sersic: float | None) -> str | None:
    kind = kind.upper()
    if kind == "DEV":
        return "a de Vaucouleurs profile"
    if kind in ("EXP", "REX"):
        return "an exponential profile"
    if kind == "SER" and sersic is not None:
        return f"Sersic n = {_half(sersic)}"
    return None


def _half(v: float) -> str:
    """A number rounded to 0.5, written without a trailing .0 (fewer tokens)."""
    r = round(v * 2) / 2
    return f"{r:.0f}" if r == int(r) else f"{r:.1f}"


def _radius(r_half: float) -> str:
    return f"{r_half:.1f} arcsec" if r_half < 2.0 else f"{_half(r_half)} arcsec"


def describe(row: Mapping) -> dict:
    """The measured quantities of one catalogue row that captions use (None when unknown)."""
    kind = str(_get(row, "type", "") or "").upper()
    fg, fr, fz = _flux(row, "g"), _flux(row, "r"), _flux(row, "z")
    mg, mr, mz = _mag(fg), _mag(fr), _mag(fz)
    e1, e2 = _get(row, "shape_e1", 0.0) or 0.0, _get(row, "shape_e2", 0.0) or 0.0
    e = min(math.hypot(e1, e2), 0.99)
    return {"type": "PSF" if kind == "DUP" else kind, "mag_r": mr,
            "g_r": mg - mr if mg is not None and mr is not None else None,
            "r_z": mr - mz if mr is not None and mz is not None else None,
            "r_half": _get(row, "shape_r"), "q": (1 - e) / (1 + e), "sersic": _get(row, "sersic")}


def caption(row: Mapping, rng: np.random.Generator | None = None, fits=None) -> str:
    """One sentence about a catalogue row. Without ``rng`` the canonical wording; with it, one of several
    wordings (same facts), so that the text tower does not learn a single template. ``fits(text) -> bool``
    (e.g. "at most 30 BPE tokens": the tiny model's context is 32 with the start and end tokens) makes a
    wording that is too long fall back to the shortest one."""
    d = describe(row)
    colour = colour_word(d["g_r"], d["r_z"])
    mag = f"r = {d['mag_r']:.1f}" if d["mag_r"] is not None else None
    pick = (lambda n: int(rng.integers(n))) if rng is not None else (lambda n: 0)
    if d["type"] in ("PSF", ""):
        adj = f"{colour} " if colour else ""
        forms = [f"an unresolved {adj}point source" + (f" of {mag}" if mag else "") + ".",
                 f"a {adj}point-like source" + (f", {mag}" if mag else "") + ", consistent with the PSF.",
                 f"a {adj}star-like source" + (f" of {mag}" if mag else "") + "."]
        return forms[pick(len(forms))]
    shape = shape_word(d["q"])
    size = size_word(d["r_half"]) if d["r_half"] is not None else None
    adjectives = ", ".join(w for w in (colour, shape) if w)
    profile = profile_phrase(d["type"], d["sersic"])
    rh = _radius(d["r_half"]) if d["r_half"] is not None else None
    plain = profile[2:] if profile and profile.startswith("a ") else profile[3:] if profile and \
        profile.startswith("an ") else profile   # "exponential profile" in a list
    forms = []
    s = f"a {adjectives} galaxy" + (f", {mag}" if mag else "")
    s += (f", half-light radius {rh}" if rh else "") + (f", {plain}." if plain else ".")
    forms.append(s)
    s = f"{size + ' ' if size else ''}{colour + ' ' if colour else ''}galaxy" + (f", {mag}" if mag else "")
    forms.append(_article(s) + f", axis ratio {d['q']:.1f}" + (f", {plain}." if plain else "."))
    s = f"{adjectives} galaxy" + (f" with {profile}" if profile else "") + (f", {mag}." if mag else ".")
    forms.append(_article(s))
    chosen = forms[pick(len(forms))]
    if fits is not None and not fits(chosen):
        chosen = min(forms, key=len)
    return chosen


def _article(s: str) -> str:
    return ("an " if s[0] in "aeiou" else "a ") + s


def captions(table, rng: np.random.Generator | None = None, fits=None) -> list[str]:
    """Captions of every row of a Sources / Tractor table (astropy Table or dict of columns)."""
    n = len(table) if not isinstance(table, dict) else len(next(iter(table.values())))
    cols = [c for c in (table.colnames if hasattr(table, "colnames") else table.keys())
            if c in CAPTION_COLUMNS or c.startswith(("flux_g", "flux_r", "flux_z", "mw_transmission_"))
            and "ivar" not in c]
    arrays = {c: np.asarray(table[c]) for c in cols}
    return [caption({c: arrays[c][i] for c in cols}, rng, fits) for i in range(n)]


def has_caption_columns(table) -> bool:
    """Whether a table has what a caption needs (a ``type`` and an r flux): Tractor rows do, detections do not."""
    names = set(table.colnames if hasattr(table, "colnames") else table.keys())
    return "type" in names and "flux_r" in names
