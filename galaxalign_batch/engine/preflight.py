"""Checks `embed` makes before starting Ray: the model, --sources, the output path (and then the lock).

Each problem is one line (``ConfigError`` / ``StoreError``), found in seconds instead of after the
cluster has started and a store full of failed tiles has been written.
"""

from __future__ import annotations

import logging
import os

from galaxalign_batch.errors import ConfigError, TileError
from galaxalign_batch.store import EmbeddingStore, StoreError, schema, store_exists

log = logging.getLogger(__name__)

CATALOG_WORDS = ("auto", "detect")


def check_catalog(catalog: str | os.PathLike | None) -> str:
    """``auto``, ``detect`` or the resolved path of a readable Tractor catalog (its columns are checked)."""
    if catalog is None:
        return "detect"
    catalog = os.fspath(catalog)
    if catalog in CATALOG_WORDS:
        return catalog
    if not os.path.exists(catalog):
        raise ConfigError(f"--sources {catalog}: no such file (expected 'auto', 'detect' or a Tractor catalog "
                          "FITS file)")
    from galaxalign_batch.survey.sources import TRACTOR_REQUIRED
    from galaxalign_batch.survey.tile import open_fits

    try:
        with open_fits(catalog) as f:
            ext = next((i for i, hdu in enumerate(f) if hdu.get_info()["hdutype"] in (1, 2)), None)
            if ext is None:
                raise ConfigError(f"--sources {catalog}: no table HDU (not a Tractor catalog)")
            columns = {c.lower() for c in f[ext].get_colnames()}
    except TileError as e:
        raise ConfigError(f"--sources {e}") from None
    missing = [c for c in TRACTOR_REQUIRED if c not in columns]
    if missing:
        raise ConfigError(f"--sources {catalog}: not a Tractor catalog (missing column(s) {', '.join(missing)})")
    return os.path.realpath(catalog)


def check_output(out: str | os.PathLike) -> str:
    """The store path, normalised; refuses a file, a non-store folder, or a parent that cannot be written."""
    out = os.path.normpath(os.fspath(out))
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise ConfigError(f"--out {out}: exists and is not a store (a file); choose another --out")
        if not store_exists(out):
            what = "an empty folder" if not os.listdir(out) else "a folder that is not a Zarr store"
            raise ConfigError(f"--out {out}: exists and is {what}; remove it or choose another --out")
        if not os.access(out, os.W_OK):
            raise ConfigError(f"--out {out}: the store is not writable by this user")
        return out
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create its folder {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: its folder {parent} is not writable by this user")
    return out


def open_for_resume(out: str, info: dict | None, embedding_dtype: str | None = None, *,
                    identity: dict | None = None) -> EmbeddingStore | None:
    """The store at ``out`` opened for writing when it exists (checked against the model), else None.

    ``info`` is :func:`~galaxalign_batch.engine.encoder.describe_model`'s; with ``info`` None only the
    model's ``identity`` is checked (the dimension then when the model is described)."""
    if not store_exists(out):
        return None
    store = EmbeddingStore.open(out, "r+")
    if store.format_version < schema.FORMAT_VERSION:
        raise StoreError(f"{out}: store format version {store.format_version} (tile keys were brick names, not "
                         f"paths); this version cannot resume it without embedding tiles twice: use a new --out "
                         "(the old store stays readable)")
    have = store.attrs.get("model", {})
    identity = info["identity"] if info is not None else identity
    if have.get("id") != identity["id"]:
        raise StoreError(f"{out}: written by model {have.get('name')} ({have.get('id')}), not by "
                         f"{identity['name']} ({identity['id']}); use another --out")
    if info is None:
        return store
    if store.dim != info["dim"]:
        raise StoreError(f"{out}: embedding dimension {store.dim}, the model gives {info['dim']}")
    have_dtype = str(store.embeddings.dtype)
    if embedding_dtype and have_dtype != embedding_dtype:
        log.info("%s: the store keeps %s embeddings; --dtype %s applies to new stores only", out, have_dtype,
                    embedding_dtype)
    return store


STRETCH_ALIASES = {"viewer": "lupton"}


def stretches_seen(model: str, identity: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(trained, unlabelled)``: the other stretches a checkpoint was trained on (``train
    --stretch-augment``), and those only a model in its lineage saw (a foundation pretrained with
    ``--stretch-augment``: without labels); ``((), ())`` for anything else."""
    if identity.get("kind") != "checkpoint":
        return (), ()
    from galaxalign_batch.model.checkpoint import foundation_stretches, read_info

    head = read_info(model)
    return tuple((head.get("training") or {}).get("stretch_augment") or ()), tuple(foundation_stretches(head))


def run_spec(info: dict, stretch: str | None, bands, pictures_only: bool = False,
             also_trained: tuple[str, ...] = (), seen_unlabelled: tuple[str, ...] = ()
             ) -> tuple[dict, tuple | None, list[str]]:
    """``(info with the run's cutout spec, bands to read, warnings)`` for ``--stretch`` and ``--bands``.

    ``--stretch`` (lupton = viewer, asinh, gz-decals) replaces the model's stretch. A trained checkpoint
    records the stretch it saw: another one is a domain shift, warned about in the summary, unless it is one
    of ``also_trained`` (:func:`stretches_seen`; one in ``seen_unlabelled``, which only its foundation
    saw, is still warned about, and says so); either way the store keeps both specs
    (``model_cutout_spec`` beside ``cutout_spec``). RGB pictures are already stretched: with only
    pictures ``--stretch`` is ignored with a warning. ``--bands``: :func:`galaxalign_batch.survey.bands.choose_bands`.
    """
    import dataclasses

    from galaxalign_batch.preprocess import CutoutSpec
    from galaxalign_batch.survey.bands import choose_bands

    spec = CutoutSpec.from_dict(info["cutout_spec"])
    notes: list[str] = []
    stretch = STRETCH_ALIASES.get(stretch, stretch) if stretch else None
    if stretch and pictures_only:
        notes.append(f"--stretch {stretch} ignored: RGB pictures are already stretched")
    elif stretch and stretch != spec.stretch:
        if stretch in also_trained:
            log.info("--stretch %s: the model was trained on %s cutouts and, by --stretch-augment, on %s ones too",
                     stretch, spec.stretch, stretch)
        elif info["identity"].get("kind") == "checkpoint":
            seen = (f"; its foundation saw {stretch} cutouts without labels, which narrows the shift but does not "
                    "remove it" if stretch in seen_unlabelled else "")
            notes.append(f"--stretch {stretch}: the model was trained on {spec.stretch} cutouts and sees {stretch} "
                         f"cutouts in this run (a domain shift: its embeddings and classes may be worse{seen}; "
                         f"train --stretch-augment {stretch} fine-tunes a model on both)")
        else:
            log.info("--stretch %s (the model %s records no trained stretch)", stretch, info["identity"].get("name"))
        spec = dataclasses.replace(spec, stretch=stretch)
        info = dict(info, cutout_spec=spec.to_dict(), model_cutout_spec=info["cutout_spec"])
    chosen, band_notes = choose_bands(spec, bands)
    for n in band_notes:
        log.warning("%s", n)
    return info, chosen, notes + band_notes


def check_stretch(out: str, store: EmbeddingStore, stretch: str | None) -> None:
    """A resumed store keeps one stretch: ``--stretch`` must be what it was made with (and given again when
    it was not the model's)."""
    stretch = STRETCH_ALIASES.get(stretch, stretch) if stretch else None
    used = (store.attrs.get("cutout_spec") or {}).get("stretch")
    overridden = "model_cutout_spec" in store.attrs
    if stretch and used and stretch != used:
        raise ConfigError(f"{out}: its cutouts were made with stretch {used}, not {stretch}: one store keeps one "
                          "stretch; give the same --stretch, or another --out")
    if overridden and not stretch:
        raise ConfigError(f"{out}: its cutouts were made with --stretch {used} (not the model's "
                          f"{store.attrs['model_cutout_spec'].get('stretch')}); give --stretch {used} again")
