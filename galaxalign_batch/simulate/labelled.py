"""A labelled training set of simulated cutouts: ``out/labelled/{train,val,test}.npz`` + ``manifest.json``.

Each image is one galaxy of a Galaxy10 class, centred (within half a pixel), drawn with its own
seeing (FWHM x 0.90-1.15) and depth (+-0.15 mag) and sky noise at that depth, in float32
nanomaggies, (bands, S, S) in g, r, z order at 0.262"/px. Image ``i`` of class ``c`` comes from
seed ``(seed, c, i)``, so the set does not depend on ``workers``. Splits are stratified by class.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.progress import bar
from galaxalign_batch.simulate.galaxies import GENERATOR_VERSION, class_keys, draw_galaxy
from galaxalign_batch.simulate.observing import Conditions, check_bands
from galaxalign_batch.survey.layout import PIXSCALE

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_N_PER_CLASS = 120
DEFAULT_STAMP = 152


def _one_class(args) -> dict[str, np.ndarray]:
    cls, n, stamp, seed, bands = args
    key = class_keys()[cls]
    nb = len(bands)
    out = dict(flux=np.empty((n, nb, stamp, stamp), dtype=np.float32), sersic_n=np.empty(n, np.float32),
               r_half=np.empty(n, np.float32), mag_r=np.empty(n, np.float32),
               psf_fwhm=np.empty((n, nb), np.float32), depth=np.empty((n, nb), np.float32))
    with bar(total=n, desc=f"labelled {key}", unit="img") as pbar:
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 3, cls, i]))
            cond = Conditions.random(rng, bands)
            img, truth = draw_galaxy(key, rng, stamp_size=stamp, psf=cond, bands=bands,
                                     offset=tuple(rng.uniform(-0.5, 0.5, 2)))
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
                      seed: int = 0, splits=(0.7, 0.15, 0.15), bands=("g", "r", "z"), workers: int = 1,
                      overwrite: bool = False) -> dict:
    """Write ``out/labelled/{train,val,test}.npz`` and ``manifest.json``; return the manifest.

    Arrays: ``flux`` (N, bands, S, S) float32 nanomaggies with sky noise, ``label`` int64 (index in the
    galaxy10 vocabulary), truth ``sersic_n``, ``r_half`` (arcsec), ``mag_r``, and the per-image
    ``psf_fwhm`` (arcsec) and 5-sigma ``depth`` (AB) per band.
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
    odir = Path(out) / "labelled"
    mpath = odir / "manifest.json"
    if mpath.exists() and not overwrite:
        old = json.loads(mpath.read_text())
        diff = {k: old.get("params", {}).get(k) for k in params if old.get("params", {}).get(k) != params[k]}
        if diff:
            raise ConfigError(f"{odir} holds a labelled set made with other parameters ({diff}); "
                              "use another --out or --overwrite")
    odir.mkdir(parents=True, exist_ok=True)

    jobs = [(c, int(n_per_class), int(stamp_size), int(seed), bands) for c in range(len(keys))]
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
    for s in SPLITS:
        items = members[s]
        order = np.random.default_rng(np.random.SeedSequence([seed, 5, SPLITS.index(s)])).permutation(len(items))
        items = [items[k] for k in order]
        arrays = {"label": np.array([c for c, _ in items], dtype=np.int64),
                  "index": np.array([i for _, i in items], dtype=np.int64)}
        for name in ("flux", "sersic_n", "r_half", "mag_r", "psf_fwhm", "depth"):
            ref = per_class[0][name]
            arrays[name] = (np.stack([per_class[c][name][i] for c, i in items]) if items
                            else np.empty((0,) + ref.shape[1:], ref.dtype))
        path = odir / f"{s}.npz"
        tmp = odir / f".{s}.tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
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
                "depth": "(N, bands) float32 5-sigma point-source depth, AB"},
        seconds=round(time.perf_counter() - t0, 2),
    )
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
