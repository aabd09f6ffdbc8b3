"""Labelled image sets for training and evaluation, from four kinds of source.

- the simulator's labelled set: a directory with ``labelled/manifest.json`` (or the ``labelled``
  directory itself) and ``{train,val,test}.npz`` holding ``flux`` (N, 3, S, S) nanomaggies (g, r, z)
  and ``label``; every stamp goes through :func:`galaxalign_batch.preprocess.make_cutouts` at its
  centre with the training :class:`CutoutSpec`, exactly as ``embed`` cuts survey tiles;
- a directory with one subfolder per class (named by class key or label text) of image files;
- a CSV file with columns ``filepath,label`` (paths relative to the CSV's directory);
- astroNN's Galaxy10 DECaLS HDF5 layout: ``images`` (N, 256, 256, 3) uint8 and ``ans`` (N,);
- labels on an embedding store: a CSV ``object_id,label`` (``label --export``) with the store
  (``store=``), or a JSON data spec naming both; each object is cut from the tile the store records
  for it with the run's :class:`CutoutSpec` (:mod:`galaxalign_batch.model.store_labels`).

RGB files and HDF5 images are already stretched: they are only resized (bilinear, antialiased) to
the model's input size, so their angular scale is whatever it was in the source. Sources without
splits are split per class (stratified) with a seeded permutation.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from galaxalign_batch.errors import NPZ_READ_ERRORS, ConfigError
from galaxalign_batch.model.inputs import resize_images
from galaxalign_batch.preprocess import CutoutSpec, make_cutouts
from galaxalign_batch.progress import bar
from galaxalign_batch.survey.layout import BANDS, PIXSCALE
from galaxalign_batch.vocabulary import Vocabulary

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
LEGACY_PIXSCALE = PIXSCALE  # arcsec / pixel of the Legacy Surveys


@dataclass
class ImageSet:
    """Images (N, 3, S, S) — uint8 0..255 or float in [0, 1] — with integer labels.

    ``alternates``: the same images made with other stretches (``train --stretch-augment``), same shape
    and dtype; :meth:`batch` with a generator draws each row from ``images`` or one of them."""

    images: np.ndarray
    labels: np.ndarray
    name: str = ""
    alternates: tuple[np.ndarray, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Float32 images in [0, 1] of the given rows; with ``rng`` and :attr:`alternates`, each row's version
        (the run's stretch or an alternate) is drawn uniformly."""
        index = np.asarray(index)
        rows = self.images[index]
        if rng is not None and self.alternates:
            version = rng.integers(0, len(self.alternates) + 1, size=len(index))
            rows = rows.copy()
            for v, alt in enumerate(self.alternates, start=1):
                sel = np.flatnonzero(version == v)
                if len(sel):
                    rows[sel] = alt[index[sel]]
        x = torch.from_numpy(np.ascontiguousarray(rows))
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.name, tuple(a[index] for a in self.alternates))


@dataclass
class Dataset:
    splits: dict[str, ImageSet]
    description: dict = field(default_factory=dict)

    def split(self, name: str) -> ImageSet:
        if name == "all":
            parts = [s for s in self.splits.values() if len(s)]
            if not parts:
                raise ConfigError(f"{self.description.get('path')}: no images at all")
            return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), "all")
        if name not in self.splits:
            raise ConfigError(f"{self.description.get('path')}: no split {name!r} (have: {', '.join(self.splits)})")
        s = self.splits[name]
        if len(s) == 0:
            raise ConfigError(f"{self.description.get('path')}: split {name!r} is empty "
                              f"(sizes: {', '.join(f'{k}={len(v)}' for k, v in self.splits.items())})")
        return s


# ---------------------------------------------------------------------------------------------- entry point

def source_kind(path: str | os.PathLike, store: str | os.PathLike | None = None) -> str:
    from galaxalign_batch.model.store_labels import is_data_spec, is_label_file

    p = Path(path)
    if store is not None:
        if not is_label_file(p):
            raise ConfigError(f"{p}: with --store, --data is a label file: a CSV with a header naming object_id and "
                              "label (what 'label --export' writes)")
        return "store-labels"
    if is_data_spec(p):
        return "store-labels"
    if is_label_file(p):
        raise ConfigError(f"{p}: a label file of object ids (object_id,label): give the store they are from with "
                          "--store STORE.zarr, or a data spec {\"labels\": ..., \"store\": ...} as --data")
    if p.is_dir():
        if (p / "labelled" / "manifest.json").is_file() or (p / "manifest.json").is_file():
            return "simulated"
        if any((p / "labelled").glob("*.npz")):
            raise ConfigError(f"{p / 'labelled'}: a simulated labelled set without its manifest.json (simulate writes "
                              "it last: that run was cut short); run the same 'galaxalign-batch simulate --out "
                              f"{p} --labelled ...' again")
        return "folders"
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".csv":
            return "csv"
        if suffix in (".h5", ".hdf5"):
            return "hdf5"
        raise ConfigError(f"{p}: unknown data file type {suffix!r} (expected a directory, .csv, .h5, .hdf5 or a .json "
                          "data spec naming a store)")
    raise ConfigError(f"{p}: data not found")


SURVEY_PIXEL_KINDS = ("simulated", "store-labels")  # sources cut from flux: any stretch can be made of them


def check_restretchable(kind: str, path: str | os.PathLike, option: str) -> None:
    """:class:`ConfigError` unless a source of ``kind`` can be cut in another stretch than the run's (``option``,
    e.g. ``--stretch-augment gz-decals``): pictures are already stretched."""
    if kind not in SURVEY_PIXEL_KINDS:
        raise ConfigError(f"{option}: {path} holds pictures that are already stretched; another stretch needs survey "
                          "pixels (the simulator's labelled set, or labels on an embedding store)")


def load_dataset(path: str | os.PathLike, vocab: Vocabulary, *, spec: CutoutSpec, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, limit_per_class: int | None = None,
                 store: str | os.PathLike | None = None, survey: list[str] | tuple[str, ...] | None = None,
                 stretch_augment: tuple[str, ...] = ()) -> Dataset:
    """Load a labelled source with its splits; RGB images are resized to ``spec.out_size``.

    ``store``: ``path`` is a label file (``object_id,label``) of that store's objects, cut from its
    tiles (``survey``: roots where its bricks are looked for). ``stretch_augment``: other stretches the
    training split is also cut with (:attr:`ImageSet.alternates`); survey pixels only (the simulator's
    labelled set, labels on a store): pictures are already stretched."""
    kind = source_kind(path, store)
    path = Path(path)
    desc = {"kind": kind, "path": str(path.resolve()), "seed": seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "limit_per_class": limit_per_class}
    stretch_augment = tuple(stretch_augment or ())
    alt_specs = [dataclasses.replace(spec, stretch=st) for st in stretch_augment]
    if alt_specs:
        check_restretchable(kind, path, f"--stretch-augment {','.join(stretch_augment)}")
        desc["stretch_augment"] = list(stretch_augment)
    alternates = ()
    if kind == "store-labels":
        from galaxalign_batch.model.store_labels import load_store_labels, read_data_spec

        labels_path, store_path, roots = (str(path), str(store), list(survey or [])) if store is not None else \
            read_data_spec(path)
        if store is None and survey:
            roots = list(survey) + roots
        images, labels, extra = load_store_labels(labels_path, store_path, vocab, spec, roots=roots,
                                                  extra_specs=alt_specs)
        if alt_specs:
            images, alternates = images[0], tuple(images[1:])
        desc.update(extra)
    elif kind == "simulated":
        splits, extra = _load_simulated(path, vocab, spec, limit_per_class, seed, alt_specs)
        desc.update(extra)
        return Dataset(splits, desc)
    elif kind in ("folders", "csv"):
        load = _load_folders if kind == "folders" else _load_csv
        images, labels = load(path, vocab, spec.out_size)
        desc["image_scale"] = "as in the source files (RGB, resized to the model input; not re-cut at a fixed angular size)"
    else:
        images, labels, pxscale = _load_hdf5(path, vocab, spec.out_size, angular_size=spec.angular_size)
        desc["image_scale"] = (f"{spec.angular_size} arcsec per image from the per-image pxscale "
                               f"({pxscale.min():.4g}-{pxscale.max():.4g} arcsec/px), resampled to the model input"
                               if pxscale is not None else
                               "as in the source file (no pxscale: RGB resized to the model input, not re-cut)")
    parts = stratified_split(labels, seed, val_fraction, test_fraction)
    splits = {}
    for name, idx in parts.items():
        idx = _limit(idx, labels, limit_per_class, seed)
        splits[name] = ImageSet(images[idx], labels[idx], name,
                                tuple(a[idx] for a in alternates) if name == "train" else ())
    return Dataset(splits, desc)


def stratified_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Row indices of train / val / test: each class permuted with ``seed`` and cut by the fractions."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"bad split fractions val={val_fraction} test={test_fraction}")
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test:n_test + n_val])
        out["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for s, v in out.items()}


def _limit(idx: np.ndarray, labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if not per_class:
        return idx
    rng = np.random.default_rng(seed + 1)
    keep = [rng.permutation(idx[labels[idx] == c])[:per_class] for c in np.unique(labels[idx])]
    return np.sort(np.concatenate(keep)) if keep else idx


# ---------------------------------------------------------------------------------------------- sources

def _load_simulated(path: Path, vocab: Vocabulary, spec: CutoutSpec, limit: int | None, seed: int,
                    alt_specs: list[CutoutSpec] | tuple = ()):
    root = path / "labelled" if (path / "labelled" / "manifest.json").is_file() else path
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{manifest_path}: unreadable manifest ({e})") from None
    pixscale = float(manifest.get("pixscale", LEGACY_PIXSCALE))
    bands = tuple(manifest.get("bands", BANDS))
    remap = _class_remap(manifest, vocab, manifest_path)
    splits, masked = {}, []
    for name in SPLITS:
        f = root / f"{name}.npz"
        if not f.is_file():
            splits[name] = ImageSet(np.zeros((0, 3, spec.out_size, spec.out_size), np.float16), np.zeros(0, np.int64), name)
            continue
        try:
            with np.load(f) as z:
                flux, labels = z["flux"], z["label"].astype(np.int64)
        except NPZ_READ_ERRORS as e:
            raise ConfigError(f"{f}: cannot read flux/label ({type(e).__name__}: {e})") from None
        if flux.ndim != 4 or flux.shape[1] != len(bands) or len(flux) != len(labels):
            raise ConfigError(f"{f}: flux must be (N, {len(bands)}, S, S) with one label per stamp, got {flux.shape}")
        if remap is not None:
            labels = remap[labels]
        _check_labels(labels, len(vocab), f)
        idx = _limit(np.arange(len(labels)), labels, limit, seed)
        flux, labels = flux[idx], labels[idx]
        pixels, frac = cut_stamps(flux, pixscale, spec, bands)
        masked.append(frac)
        alternates = tuple(cut_stamps(flux, pixscale, alt, bands)[0] for alt in alt_specs) if name == "train" else ()
        splits[name] = ImageSet(pixels, labels, name, alternates)
    if masked:
        m = float(np.concatenate(masked).mean()) if sum(len(x) for x in masked) else 0.0
        if m > 0.01:
            log.warning("the %.1f\" cutouts extend beyond the stamps: mean masked fraction %.2f "
                        "(use a smaller --angular-size)", spec.angular_size, m)
    return splits, {"pixscale": pixscale, "manifest": str(manifest_path), "preprocess": "make_cutouts at stamp centres"}


def cut_stamps(flux: np.ndarray, pixscale: float, spec: CutoutSpec, bands=BANDS) -> tuple[np.ndarray, np.ndarray]:
    """The cutout at the centre of each stamp (N, nb, H, W) with ``spec``: pixels (N, 3, S, S), masked fraction."""
    n, _, h, w = flux.shape
    out = np.empty((n, 3, spec.out_size, spec.out_size), np.uint8 if spec.dtype == "uint8" else np.float16)
    frac = np.empty(n, np.float32)
    cx, cy = np.array([(w - 1) / 2.0]), np.array([(h - 1) / 2.0])
    for i in bar(range(n), total=n, desc="cutouts", unit="img"):
        batch = make_cutouts(np.asarray(flux[i], np.float32), None, cx, cy, pixscale, spec, bands)
        out[i] = batch.pixels[0]
        frac[i] = batch.masked_fraction[0]
    return out, frac


def _class_remap(manifest: dict, vocab: Vocabulary, where: Path) -> np.ndarray | None:
    """Map the manifest's class order onto the vocabulary's, when the manifest lists its classes."""
    classes = manifest.get("classes") or (manifest.get("vocabulary") or {}).get("keys")
    if not classes:
        return None
    keys = [c["key"] if isinstance(c, dict) else str(c) for c in classes]
    try:
        return np.asarray([vocab.index(k) for k in keys], np.int64)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_labels(labels: np.ndarray, k: int, where) -> None:
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        i = int(np.argmax(bad))
        raise ConfigError(f"{where}: label {int(labels[i])} at row {i} is not a class of the vocabulary (0..{k - 1})")


def resize_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) or (N, 3, H, W) -> uint8 (N, 3, size, size), bilinear with antialiasing."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = resize_images(x.float(), size).round().clamp(0, 255)
    return x.to(torch.uint8).numpy()


def read_rgb(path: Path, size: int, where: str = "") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ConfigError(f"{where}image file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ConfigError(f"{where}{path}: cannot read image ({' '.join(str(e).split())})") from None
    return resize_rgb(arr[None], size)[0]


def _load_files(entries: list[tuple[Path, int, str]], size: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not entries:
        raise ConfigError(f"{what}: no images")
    images = np.empty((len(entries), 3, size, size), np.uint8)
    for i, (p, _, where) in enumerate(bar(entries, total=len(entries), desc="images", unit="img")):
        images[i] = read_rgb(p, size, where)
    return images, np.asarray([c for _, c, _ in entries], np.int64)


def _load_folders(path: Path, vocab: Vocabulary, size: int):
    entries = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        c = _class_of_name(sub.name, vocab)
        if c is None:
            raise ConfigError(f"{sub}: folder of unknown class {sub.name!r}; classes: {', '.join(vocab.keys)}")
        entries += [(f, c, "") for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise ConfigError(f"{path}: no class subfolders with image files ({', '.join(IMAGE_SUFFIXES)})")
    return _load_files(entries, size, str(path))


def _class_of_name(name: str, vocab: Vocabulary) -> int | None:
    """Class index of a folder name: a key, or a label text (underscores read as spaces)."""
    for candidate in (name, name.replace("_", " ")):
        try:
            return vocab.index(candidate)
        except ConfigError:
            pass
    return None


def _load_csv(path: Path, vocab: Vocabulary, size: int):
    entries = []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ConfigError(f"{path}: empty CSV (expected columns filepath,label)")
    header = [c.strip().lower() for c in rows[0]]
    if "filepath" in header and "label" in header:
        fi, li, start = header.index("filepath"), header.index("label"), 1
    else:
        fi, li, start = 0, 1, 0
    for n, row in enumerate(rows[start:], start=start + 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) <= max(fi, li):
            raise ConfigError(f"{path} line {n}: expected filepath,label, got {row!r}")
        label = row[li].strip()
        try:
            c = int(label) if label.lstrip("-").isdigit() else vocab.index(label)
        except ConfigError as e:
            raise ConfigError(f"{path} line {n}: {e}") from None
        if not 0 <= c < len(vocab):
            raise ConfigError(f"{path} line {n}: label {c} is not a class index (0..{len(vocab) - 1})")
        p = Path(row[fi].strip())
        entries.append((p if p.is_absolute() else path.parent / p, c, f"{path} line {n}: "))
    return _load_files(entries, size, str(path))


def rgb_at_angular_size(image: np.ndarray, pxscale: float, angular_size: float, size: int) -> np.ndarray:
    """uint8 (H, W, 3) picture of ``pxscale`` arcsec/px -> uint8 (3, size, size) of ``angular_size`` arcsec
    around its centre: the preprocessing's exact box / bilinear resampling of each plane (no stretch,
    array order kept: the picture is already north up); what lies outside the picture is black."""
    spec = CutoutSpec(angular_size=angular_size, out_size=size, stretch="none", orientation="fits")
    planes = np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.float32)
    h, w = planes.shape[1:]
    out = make_cutouts(planes, None, [(w - 1) / 2.0], [(h - 1) / 2.0], float(pxscale), spec,
                       bands=("p0", "p1", "p2")).pixels[0]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _load_hdf5(path: Path, vocab: Vocabulary, size: int, chunk: int = 256, angular_size: float | None = None):
    """(images, labels, pxscale or None). With a ``pxscale`` dataset (Galaxy10 DECaLS: arcsec/px of each
    image) and ``angular_size``, every image is cut to ``angular_size`` arcsec at its own scale."""
    try:
        import h5py
    except ImportError:
        raise ConfigError("reading Galaxy10 HDF5 files needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConfigError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "images" not in f or "ans" not in f:
            raise ConfigError(f"{path}: expected datasets 'images' (N, H, W, 3) uint8 and 'ans' (N,) "
                              f"(astroNN Galaxy10 DECaLS layout), found {', '.join(f.keys())}")
        ds, labels = f["images"], np.asarray(f["ans"]).astype(np.int64).reshape(-1)
        if ds.ndim != 4 or ds.shape[-1] != 3 or ds.shape[0] != len(labels):
            raise ConfigError(f"{path}: 'images' must be (N, H, W, 3) with N = len(ans), got {ds.shape} and {len(labels)}")
        _check_labels(labels, len(vocab), path)
        pxscale = None
        if "pxscale" in f and angular_size is not None:
            pxscale = np.asarray(f["pxscale"], np.float64).reshape(-1)
            if len(pxscale) != len(labels) or not np.all(np.isfinite(pxscale) & (pxscale > 0)):
                raise ConfigError(f"{path}: 'pxscale' must hold one finite arcsec/px > 0 per image "
                                  f"({len(labels)}), got {len(pxscale)} values")
        images = np.empty((len(labels), 3, size, size), np.uint8)
        for i in bar(range(0, len(labels), chunk), desc="hdf5", unit="chunk"):
            block = np.asarray(ds[i:i + chunk])
            block = block.astype(np.uint8) if block.dtype != np.uint8 else block
            if pxscale is None:
                images[i:i + chunk] = resize_rgb(block, size)
            else:
                for k in range(len(block)):
                    images[i + k] = rgb_at_angular_size(block[k], pxscale[i + k], angular_size, size)
    return images, labels, pxscale
