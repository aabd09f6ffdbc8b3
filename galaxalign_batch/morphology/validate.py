"""Checking measured (or predicted) Sersic index and half-light radius against the simulator's truth.

The simulated Tractor-like catalogs carry ``true_sersic`` and ``true_r_half`` of each galaxy's main
body (docs/simulate.md): exact for the single-Sersic classes (``round_smooth``,
``in_between_round_smooth``, ``cigar_smooth``); for disks, spirals, edge-ons, disturbed and merging
galaxies they describe one component of a composite light profile, so a single-Sersic fit is not
expected to return them. ``true_r_half`` is the circularised half-light radius (the simulator's
shear preserves area), to be compared with statmorph's ``sersic_rhalf_circ``
(``sersic_rhalf * sqrt(1 - sersic_ellip)``).

Comparisons are in log10 of measured / true: median (bias, dex) and NMAD (scatter, dex), and the
fraction within 20 %, in bins of a chosen quantity (true r magnitude, S/N per pixel).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from astropy.table import Table, vstack

from galaxalign_batch.errors import ConfigError

SINGLE_SERSIC_CLASSES = ("round_smooth", "in_between_round_smooth", "cigar_smooth")
TRUTH_COLUMNS = ("true_class_key", "true_mag_r", "true_r_half", "true_sersic")


def truth_table(roots: Sequence[str | os.PathLike]) -> Table:
    """Truth rows (``object_id`` + truth columns) of every Tractor catalog under the survey roots."""
    from galaxalign_batch.survey.detection_quality import read_reference
    from galaxalign_batch.survey import layout

    parts = []
    for root in roots:
        for brick in layout.list_bricks(root):
            path = layout.tractor_path(root, brick)
            if path.exists():
                ref = read_reference(path)
                if all(c in ref.colnames for c in TRUTH_COLUMNS):
                    parts.append(ref[["object_id", *TRUTH_COLUMNS, "psfsize_r"]])
    if not parts:
        raise ConfigError(f"no simulated truth (Tractor catalogs with {', '.join(TRUTH_COLUMNS)}) under "
                          f"{', '.join(map(str, roots))}")
    out = vstack(parts, metadata_conflicts="silent")
    out["object_id"] = np.asarray(out["object_id"]).astype(str)
    return out


def log_ratio(measured, true) -> np.ndarray:
    m, t = np.asarray(measured, np.float64), np.asarray(true, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((m > 0) & (t > 0), np.log10(np.where(m > 0, m, 1.0) / np.where(t > 0, t, 1.0)), np.nan)


def _nmad(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else float("nan")


def compare(measured, true, by=None, edges=None, *, label: str = "bin") -> Table:
    """Bias and scatter of log10(measured / true), overall and in bins of ``by`` (``edges``).

    Rows where either value is missing or not positive are left out (``n`` counts the rest).
    """
    lr = log_ratio(measured, true)
    ok = np.isfinite(lr)
    names, groups = ["all"], [ok]
    if by is not None and edges is not None:
        b = np.asarray(by, np.float64)
        for lo, hi in zip(edges[:-1], edges[1:]):
            names.append(f"{lo:g}-{hi:g}")
            groups.append(ok & (b >= lo) & (b < hi))
    rows = {label: names, "n": [], "median_dex": [], "nmad_dex": [], "median_ratio": [], "within_20pct": []}
    for g in groups:
        x = lr[g]
        rows["n"].append(int(g.sum()))
        med = float(np.median(x)) if len(x) else float("nan")
        rows["median_dex"].append(med)
        rows["nmad_dex"].append(_nmad(x))
        rows["median_ratio"].append(10 ** med if np.isfinite(med) else float("nan"))
        rows["within_20pct"].append(float(np.mean(np.abs(10 ** x - 1) <= 0.2)) if len(x) else float("nan"))
    t = Table(rows)
    for c in ("median_dex", "nmad_dex", "median_ratio", "within_20pct"):
        t[c].format = "{:.3f}"
    return t
