"""A labelled training set of simulated cutouts: ``out/labelled/{train,val,test}.npz`` + ``manifest.json``.

Each image is one galaxy of a Galaxy10 class, centred (within half a pixel), drawn with its own
seeing (FWHM x 0.90-1.15) and depth (+-0.15 mag) and sky noise at that depth, in float32
nanomaggies, (bands, S, S) in g, r, z order at 0.262"/px. Image ``i`` of class ``c`` comes from
seed ``(seed, c, i)``, so the set does not depend on ``workers``. Splits are stratified by class.

``neighbours`` (mean per stamp, Poisson) adds other galaxies (random classes, r from the survey's
dN/dm) and stars around the labelled one, at least ``NEIGHBOUR_MIN_SEP`` from its centre, as the
survey's cutouts have them: ``neighbours="survey"`` is the simulated survey's default density (2000
galaxies and 300 stars per full brick: 3.6 galaxies and 0.5 stars in a 152-px stamp). They come
from their own seed ``(seed, 6, c, i)``, so the labelled galaxy itself is the same with or without them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.progress import bar
from galaxalign_batch.simulate.galaxies import GENERATOR_VERSION, class_keys, draw_galaxy
from galaxalign_batch.simulate.observing import Conditions, check_bands
from galaxalign_batch.survey.layout import BANDS, PIXSCALE

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_N_PER_CLASS = 120
DEFAULT_STAMP = 152
NEIGHBOUR_MIN_SEP = 10.0   # arcsec: the survey's minimum separation at its default density
SURVEY_GALAXIES, SURVEY_STARS, FULL_BRICK_PX = 2000, 300, 3600


def _neighbour_rate(neighbours, stamp: int) -> tuple[float, float]:
    """(galaxies, stars) per stamp: ``"survey"`` = the survey default's density, a number = galaxies."""
    if neighbours in (None, 0, 0.0, "0", "none"):
        return 0.0, 0.0
    frac = (stamp / FULL_BRICK_PX) ** 2
    if neighbours == "survey":
        return SURVEY_GALAXIES * frac, SURVEY_STARS * frac
    g = float(neighbours)
    if not 0 <= g <= 50:
        raise ConfigError(f"neighbours must be 'survey' or a number of galaxies per stamp in 0..50, got {neighbours!r}")
    return g, g * SURVEY_STARS / SURVEY_GALAXIES


def _add_neighbours(img: np.ndarray, rng: np.random.Generator, rates, stamp: int, cond, bands, pixscale: float) -> int:
    from galaxalign_batch.simulate.galaxies import MAG_RANGE, draw_star, star_magnitude
    from galaxalign_batch.simulate.survey import MAG_SLOPE

    keys = class_keys()
    n_gal, n_star = int(rng.poisson(rates[0])), int(rng.poisson(rates[1]))
    half = stamp / 2.0
    r_min = NEIGHBOUR_MIN_SEP / pixscale
    for k in range(n_gal + n_star):
        while True:
            dx, dy = rng.uniform(-half, half, 2)
            if dx * dx + dy * dy >= r_min * r_min:
                break
        if k < n_gal:
            key = keys[int(rng.integers(len(keys)))]
            mag = star_magnitude(rng, *MAG_RANGE, slope=MAG_SLOPE)
            nb, _ = draw_galaxy(key, rng, stamp_size=stamp, psf=cond, bands=bands, mag_r=mag, offset=(dx, dy))
        else:
            nb, _ = draw_star(rng, psf=cond, bands=bands, stamp_size=stamp, offset=(dx, dy))
        img += nb
    return n_gal + n_star


def _one_class(args) -> dict[str, np.ndarray]:
    cls, n, stamp, seed, bands, neighbours = args
    rates = _neighbour_rate(neighbours, stamp)
    key = class_keys()[cls]
    nb = len(bands)
    out = dict(flux=np.empty((n, nb, stamp, stamp), dtype=np.float32), sersic_n=np.empty(n, np.float32),
               r_half=np.empty(n, np.float32), mag_r=np.empty(n, np.float32),
               psf_fwhm=np.empty((n, nb), np.float32), depth=np.empty((n, nb), np.float32),
               neighbours=np.zeros(n, np.int16))
    with bar(total=n, desc=f"labelled {key}", unit="img") as pbar:
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 3, cls, i]))
            cond = Conditions.random(rng, bands)
            img, truth = draw_galaxy(key, rng, stamp_size=stamp, psf=cond, bands=bands,
                                     offset=tuple(rng.uniform(-0.5, 0.5, 2)))
            if rates[0] or rates[1]:
                nrng = np.random.default_rng(np.random.SeedSequence([seed, 6, cls, i]))
                out["neighbours"][i] = _add_neighbours(img, nrng, rates, stamp, cond, bands, PIXSCALE)
            img += rng.standard_normal(img.shape, dtype=np.float32) * cond.sigmas().astype(np.float32)[:, None, None]
            out["flux"][i] = img
            out["sersic_n"][i], out["r_half"][i], out["mag_r"][i] = truth["sersic_n"], truth["r_half"], truth["mag_r"]
            out["psf_fwhm"][i] = [cond.fwhm[b] for b in bands]
            out["depth"][i] = [cond.depth[b] for b in bands]
            pbar.update(1)
    return out


def split_counts(n: int, fractions) -> list[int]:
    """Per-split counts for ``n`` items of one class: rounded fractions, the remainder to train."""
    counts = [int(round(n * f)) for f in fractions]
    counts[0] = n - sum(counts[1:])
    if counts[0] < 0:
        raise ConfigError(f"cannot split {n} items per class as {list(fractions)}")
    return counts


def simulate_labelled(out, *, n_per_class: int = DEFAULT_N_PER_CLASS, stamp_size: int = DEFAULT_STAMP,
                      seed: int = 0, splits=(0.7, 0.15, 0.15), bands=BANDS, workers: int = 1,
                      overwrite: bool = False, neighbours: float | str = 0, force_unlock: bool = False) -> dict:
    """Write ``out/labelled/{train,val,test}.npz`` and ``manifest.json``; return the manifest.

    Arrays: ``flux`` (N, bands, S, S) float32 nanomaggies with sky noise, ``label`` int64 (index in the
    galaxy10 vocabulary), truth ``sersic_n``, ``r_half`` (arcsec), ``mag_r``, and the per-image
    ``psf_fwhm`` (arcsec) and 5-sigma ``depth`` (AB) per band, and ``neighbours`` (sources added around it).

    Holds ``out``'s lease (the survey root's, as :func:`simulate_survey`). The manifest is removed before
    the first split is replaced and written after the last, so a set cut short by a kill has none (and is
    no labelled set to ``train``) rather than one describing other files.
    """
    from galaxalign_batch.vocabulary import load_vocabulary

    t0 = time.perf_counter()
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ConfigError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    if isinstance(stamp_size, bool) or not isinstance(stamp_size, (int, np.integer)) or not 16 <= stamp_size <= 1024:
        raise ConfigError(f"stamp_size must be an integer from 16 to 1024 px, got {stamp_size!r}")
    splits = tuple(float(f) for f in splits)
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise ConfigError(f"splits must be three non-negative fractions summing to 1, got {list(splits)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    bands = check_bands(bands)
    vocab = load_vocabulary("galaxy10")
    keys = class_keys()
    params = dict(n_per_class=int(n_per_class), stamp_size=int(stamp_size), seed=int(seed), splits=list(splits),
                  bands=list(bands), generator_version=GENERATOR_VERSION)
    _neighbour_rate(neighbours, int(stamp_size))   # validates
    if neighbours not in (0, 0.0, None, "0", "none"):
        params["neighbours"] = neighbours
    with lease.locked(out, force=force_unlock):
        return _write_labelled(Path(out), params, vocab, keys, int(n_per_class), int(stamp_size), int(seed), splits,
                               bands, workers, overwrite, neighbours, t0)


def _write_labelled(out: Path, params, vocab, keys, n_per_class, stamp_size, seed, splits, bands, workers, overwrite,
                    neighbours, t0) -> dict:
    odir = out / "labelled"
    mpath = odir / "manifest.json"
    if mpath.exists() and not overwrite:
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{mpath}: unreadable ({e}); use another --out or --overwrite") from None
        diff = {k: old.get("params", {}).get(k) for k in params if old.get("params", {}).get(k) != params[k]}
        if diff:
            raise ConfigError(f"{odir} holds a labelled set made with other parameters ({diff}); "
                              "use another --out or --overwrite")
    odir.mkdir(parents=True, exist_ok=True)

    jobs = [(c, int(n_per_class), int(stamp_size), int(seed), bands, neighbours) for c in range(len(keys))]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            per_class = list(pool.map(_one_class, jobs))
    else:
        per_class = [_one_class(j) for j in jobs]

    counts = split_counts(int(n_per_class), splits)
    members: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    for c in range(len(keys)):
        perm = np.random.default_rng(np.random.SeedSequence([seed, 4, c])).permutation(n_per_class)
        bounds = np.cumsum([0] + counts)
        for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            members[s] += [(c, int(i)) for i in perm[lo:hi]]
    files, per_split = {}, {}
    mpath.unlink(missing_ok=True)
    for s in SPLITS:
        items = members[s]
        order = np.random.default_rng(np.random.SeedSequence([seed, 5, SPLITS.index(s)])).permutation(len(items))
        items = [items[k] for k in order]
        arrays = {"label": np.array([c for c, _ in items], dtype=np.int64),
                  "index": np.array([i for _, i in items], dtype=np.int64)}
        for name in ("flux", "sersic_n", "r_half", "mag_r", "psf_fwhm", "depth", "neighbours"):
            ref = per_class[0][name]
            arrays[name] = (np.stack([per_class[c][name][i] for c, i in items]) if items
                            else np.empty((0,) + ref.shape[1:], ref.dtype))
        path = odir / f"{s}.npz"
        with atomic.replacing(path) as tmp:
            np.savez(tmp, **arrays)
        files[s] = str(path)
        per_split[s] = {keys[c]: int((arrays["label"] == c).sum()) for c in range(len(keys))}
    manifest = dict(
        params=params,
        vocabulary=dict(name=vocab.name, version=vocab.version, keys=keys, digest=vocab.digest()),
        bands=list(bands), pixscale=PIXSCALE, stamp_size=int(stamp_size), units="nanomaggy",
        seed=int(seed), generator="galaxalign_batch.simulate", generator_version=GENERATOR_VERSION,
        counts=per_split, files=files,
        arrays={"flux": "(N, bands, S, S) float32 nanomaggies with sky noise", "label": "int64 class index",
                "index": "int64 image index within its class (seed (seed, class, index))",
                "sersic_n": "float32 Sersic index of the main body", "r_half": "float32 half-light radius, arcsec",
                "mag_r": "float32 total r-band AB magnitude", "psf_fwhm": "(N, bands) float32 arcsec",
                "depth": "(N, bands) float32 5-sigma point-source depth, AB",
                "neighbours": "int16 galaxies and stars drawn around the labelled one"},
        seconds=round(time.perf_counter() - t0, 2),
    )
    lease.check_held(out)
    atomic.write_json(mpath, manifest, indent=2)
    return manifest
