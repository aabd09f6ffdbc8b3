"""Schematic symbols of galaxy classes: drawn icons (like Galaxy Zoo's) or the user's own images.

The built-in drawer knows the ten Galaxy10 classes by key. Each symbol is a vector drawing
(ellipses, bars, logarithmic-spiral arms, thin disks, tidal tails) transformed by a random affine
map (rotation, scale, mirror, shear and stretch), drawn with PIL on a canvas ``supersample`` times
larger than the output, Gaussian-blurred and box-reduced (anti-aliasing), then given a random
brightness, tint and pixel noise. Augmentation also jitters line widths and shape parameters (arm
pitch, bulge size, axis ratios), so that the symbol encoder cannot memorise pixels.

User symbols: a folder with one subfolder per class key (``DIR/barred_spiral/*.png``) or files whose
name starts with a class key (``DIR/barred_spiral_1.png``); they are augmented with the same random
affine map, brightness and noise. Classes without user images fall back to the drawer; a class the
drawer does not know and the folder does not cover is an error.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.vocabulary import Vocabulary

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DRAWER_VERSION = 1


@dataclass(frozen=True)
class SymbolSettings:
    """How symbols are drawn and augmented; stored in checkpoints."""

    size: int = 64                              # output pixels (the model's input size)
    supersample: int = 4                        # drawing canvas = size * supersample
    rotation: bool = True                       # random rotation in [0, 360) degrees
    scale_range: tuple[float, float] = (0.75, 1.1)
    line_width_range: tuple[float, float] = (0.7, 1.4)
    distortion: float = 0.12                    # shear / stretch amplitude and relative shape jitter
    mirror: bool = True
    brightness_range: tuple[float, float] = (0.75, 1.0)
    noise: float = 0.02                         # Gaussian pixel noise sigma (output units 0..1)
    version: int = DRAWER_VERSION

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SymbolSettings":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Vector drawing

class _Canvas:
    """A supersampled grey canvas with an affine map from unit coordinates (galaxy within r < 1)."""

    def __init__(self, size: int, matrix: np.ndarray, offset: np.ndarray, line_factor: float):
        self.size = size
        self.image = Image.new("L", (size, size), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.half = size / 2.0
        self.matrix = matrix
        self.offset = offset
        self.line_factor = line_factor
        self.pixel_per_unit = self.half * 0.95 * math.sqrt(abs(np.linalg.det(matrix)))

    def _px(self, pts: np.ndarray) -> list[tuple[float, float]]:
        p = pts @ self.matrix.T + self.offset
        xy = self.half + p * self.half * 0.95
        return [(float(x), float(self.size - y)) for x, y in xy]

    def polygon(self, pts: np.ndarray, level: float) -> None:
        self.draw.polygon(self._px(pts), fill=int(round(255 * min(max(level, 0.0), 1.0))))

    def line(self, pts: np.ndarray, width: float, level: float, taper: float = 0.0) -> None:
        """A polyline of ``width`` unit lengths, optionally tapering to ``(1 - taper) * width``."""
        px = self._px(pts)
        fill = int(round(255 * min(max(level, 0.0), 1.0)))
        n = len(px) - 1
        for i in range(n):
            w = width * (1.0 - taper * i / max(n - 1, 1)) * self.line_factor * self.pixel_per_unit
            self.draw.line([px[i], px[i + 1]], fill=fill, width=max(1, int(round(w))))
            r = w / 2.0
            if r >= 1.5:  # round joints
                x, y = px[i + 1]
                self.draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    def blob(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, peak: float = 1.0,
             levels: int = 6, floor: float = 0.3) -> None:
        """A smooth galaxy: concentric ellipses, brightness rising inwards from ``floor * peak`` to ``peak``."""
        for k in range(levels):
            f = 1.0 - k / levels
            self.polygon(ellipse(cx, cy, rx * f, ry * f, angle), peak * (floor + (1 - floor) * (k + 1) / levels))


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def log_spiral(r0: float, r1: float, pitch_deg: float, phase: float, n: int = 90) -> np.ndarray:
    """Points of ``r = r0 * exp(tan(pitch) * phi)`` from ``r0`` out to ``r1``, starting at angle ``phase``."""
    b = math.tan(math.radians(pitch_deg))
    phi = np.linspace(0.0, math.log(r1 / r0) / b, n)
    r = r0 * np.exp(b * phi)
    return np.stack([r * np.cos(phi + phase), r * np.sin(phi + phase)], axis=1)


class _Jitter:
    """Relative jitter of shape parameters: ``x * (1 + U(-a, a))``, none for the canonical symbol."""

    def __init__(self, rng: np.random.Generator, amplitude: float):
        self.rng, self.a = rng, amplitude

    def __call__(self, x: float, rel: float = 1.0) -> float:
        return x * (1.0 + self.a * rel * self.rng.uniform(-1.0, 1.0)) if self.a else x

    def uniform(self, lo: float, hi: float, default: float) -> float:
        return float(self.rng.uniform(lo, hi)) if self.a else default


def _spiral(c: _Canvas, j: _Jitter, bulge: float, r0: float, pitch: float, arms: int) -> None:
    c.blob(0, 0, j(0.85, 0.5), j(0.85, 0.5), peak=0.3, levels=3, floor=0.4)            # faint disk
    for k in range(arms):
        phase = 2 * math.pi * k / arms
        c.line(log_spiral(r0, j(0.9, 0.3), j(pitch, 0.8), phase), width=j(0.075, 0.5), level=0.75, taper=0.6)
    c.blob(0, 0, bulge, bulge, peak=1.0, levels=4)


def _round_smooth(c, j):
    r = j(0.62, 0.5)
    c.blob(0, 0, r, r * j(0.95, 0.3))


def _in_between(c, j):
    r = j(0.72, 0.4)
    c.blob(0, 0, r, r * j(0.62, 0.6))


def _cigar(c, j):
    r = j(0.88, 0.3)
    c.blob(0, 0, r, r * j(0.27, 0.8))


def _edge_on_no_bulge(c, j):
    c.blob(0, 0, j(0.92, 0.2), j(0.07, 1.0), levels=4)
    c.line(np.array([[-0.8, 0.0], [0.8, 0.0]]) * j(1.0, 0.2), width=j(0.035, 0.5), level=1.0)


def _edge_on_with_bulge(c, j):
    c.blob(0, 0, j(0.92, 0.2), j(0.075, 1.0), peak=0.8, levels=4)
    rb = j(0.27, 0.5)
    c.blob(0, 0, rb, rb * j(0.78, 0.4), peak=1.0, levels=5)


def _barred_spiral(c, j):
    bar = j(0.42, 0.4)
    c.blob(0, 0, j(0.85, 0.5), j(0.85, 0.5), peak=0.3, levels=3, floor=0.4)
    c.blob(0, 0, bar, j(0.085, 0.6), peak=0.85, levels=3, floor=0.6)
    pitch = j(15.0, 0.6)
    for phase in (0.0, math.pi):
        c.line(log_spiral(bar, j(0.9, 0.2), pitch, phase), width=j(0.075, 0.5), level=0.75, taper=0.6)
    rb = j(0.14, 0.4)
    c.blob(0, 0, rb, rb, peak=1.0, levels=4)


def _tight_spiral(c, j):
    _spiral(c, j, bulge=j(0.17, 0.4), r0=j(0.16, 0.3), pitch=11.0, arms=2)


def _loose_spiral(c, j):
    _spiral(c, j, bulge=j(0.12, 0.4), r0=j(0.12, 0.3), pitch=32.0, arms=2)


def _merging(c, j):
    sep = j(0.33, 0.4)
    ang = j.uniform(-0.6, 0.6, 0.2)
    ca, sa = math.cos(ang), math.sin(ang)
    a, b = np.array([-sep * ca, -sep * sa]), np.array([sep * ca, sep * sa]) * j(1.0, 0.3)
    ra, rb = j(0.32, 0.4), j(0.25, 0.4)
    # tidal tails: arcs leaving each nucleus away from the other, sweeping in opposite senses
    t = np.linspace(0.0, 1.0, 40)
    for centre, r, phi0, sign in ((a, ra, ang + math.pi, 1.0), (b, rb, ang, 1.0)):
        radius = 0.7 * r + j(0.55, 0.4) * t
        phi = phi0 + sign * j(1.9, 0.4) * t
        c.line(centre + np.stack([radius * np.cos(phi), radius * np.sin(phi)], axis=1), width=j(0.08, 0.5),
               level=0.5, taper=0.8)
    c.blob(a[0], a[1], ra, ra * j(0.8, 0.4), angle=ang, levels=5)
    c.blob(b[0], b[1], rb, rb * j(0.8, 0.4), angle=-ang, peak=0.9, levels=5)


def _disturbed(c, j):
    shape_rng = j.rng if j.a else np.random.default_rng(12345)
    t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    amps = shape_rng.uniform(0.12, 0.3, size=3)
    phases = shape_rng.uniform(0, 2 * np.pi, size=3)
    r = 0.55 * (1 + sum(amps[m] * np.cos((m + 1) * t + phases[m]) for m in range(3)))
    nucleus = np.array([0.12 * math.cos(phases[0]), 0.12 * math.sin(phases[0])])
    for k, (f, level) in enumerate(((1.0, 0.3), (0.72, 0.45), (0.45, 0.65))):
        off = nucleus * (k / 2)
        c.polygon(np.stack([off[0] + f * r * np.cos(t), off[1] + f * r * np.sin(t)], axis=1), level)
    for _ in range(3):  # bright clumps
        ang, rad = shape_rng.uniform(0, 2 * np.pi), shape_rng.uniform(0.15, 0.45)
        rc = j(0.07, 0.5)
        c.blob(rad * math.cos(ang), rad * math.sin(ang), rc, rc, peak=0.85, levels=2, floor=0.7)
    rb = j(0.13, 0.4)
    c.blob(nucleus[0], nucleus[1], rb, rb * 0.8, peak=1.0, levels=3)


DRAWERS: dict[str, Callable[[_Canvas, _Jitter], None]] = {
    "disturbed": _disturbed,
    "merging": _merging,
    "round_smooth": _round_smooth,
    "in_between_round_smooth": _in_between,
    "cigar_smooth": _cigar,
    "barred_spiral": _barred_spiral,
    "unbarred_tight_spiral": _tight_spiral,
    "unbarred_loose_spiral": _loose_spiral,
    "edge_on_no_bulge": _edge_on_no_bulge,
    "edge_on_with_bulge": _edge_on_with_bulge,
}
"""The built-in drawer's classes, by vocabulary key."""


def _random_affine(rng: np.random.Generator, s: SymbolSettings, augment: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(2x2 matrix, offset, line-width factor) of one augmented draw; identity for the canonical one."""
    if not augment:
        return np.eye(2), np.zeros(2), 1.0
    theta = rng.uniform(0, 2 * np.pi) if s.rotation else 0.0
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    d = s.distortion
    stretch = np.diag([1 + rng.uniform(-d, d), 1 - rng.uniform(-d, d)])
    shear = np.array([[1.0, rng.uniform(-d, d)], [0.0, 1.0]])
    mirror = np.diag([-1.0, 1.0]) if (s.mirror and rng.random() < 0.5) else np.eye(2)
    scale = rng.uniform(*s.scale_range)
    matrix = scale * rot @ shear @ stretch @ mirror
    offset = rng.normal(0.0, 0.3 * d, size=2)
    return matrix, offset, float(rng.uniform(*s.line_width_range))


def _finish(grey: np.ndarray, rng: np.random.Generator, s: SymbolSettings, augment: bool) -> np.ndarray:
    """Grey (S,S) in [0,1] -> (3,S,S) float32 with random brightness, tint and noise."""
    if augment:
        grey = grey * rng.uniform(*s.brightness_range)
        tint = rng.uniform(0.85, 1.0, size=3)
    else:
        tint = np.ones(3)
    rgb = tint[:, None, None] * grey[None]
    if augment and s.noise > 0:
        rgb = rgb + rng.normal(0.0, s.noise, size=rgb.shape)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def draw_symbol(key: str, settings: SymbolSettings = SymbolSettings(), rng: np.random.Generator | None = None) -> np.ndarray:
    """One symbol of the class ``key`` as (3, S, S) float32 in [0, 1]; canonical when ``rng`` is None."""
    if key not in DRAWERS:
        raise ConfigError(f"the built-in symbol drawer has no class {key!r} (it knows: {', '.join(DRAWERS)}); "
                          f"supply symbol images with --symbols DIR")
    augment = rng is not None
    rng = rng if augment else np.random.default_rng(0)
    big = settings.size * settings.supersample
    matrix, offset, line_factor = _random_affine(rng, settings, augment)
    canvas = _Canvas(big, matrix, offset, line_factor)
    DRAWERS[key](canvas, _Jitter(rng, settings.distortion if augment else 0.0))
    blur = (rng.uniform(0.4, 1.0) if augment else 0.6) * settings.supersample
    img = canvas.image.filter(ImageFilter.GaussianBlur(blur)).reduce(settings.supersample)
    return _finish(np.asarray(img, dtype=np.float32) / 255.0, rng, settings, augment)


# ----------------------------------------------------------------------------------------------
# User images

def _load_rgb(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read symbol image ({e})") from None


def find_user_symbols(folder: str | Path, keys: list[str]) -> dict[str, list[Path]]:
    """Image files per class key: ``folder/<key>/*`` or ``folder/<key>*.<ext>`` (longest key wins)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--symbols {folder}: not a directory")
    found: dict[str, list[Path]] = {}
    by_length = sorted(keys, key=len, reverse=True)
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if entry.name not in keys:
                raise ConfigError(f"{entry}: symbol folder of unknown class {entry.name!r} (classes: {', '.join(keys)})")
            files = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            found.setdefault(entry.name, []).extend(files)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            key = next((k for k in by_length if entry.stem.startswith(k)), None)
            if key is None:
                raise ConfigError(f"{entry}: symbol file name does not start with a class key ({', '.join(keys)})")
            found.setdefault(key, []).append(entry)
    return {k: v for k, v in found.items() if v}


def _augment_user(img: np.ndarray, rng: np.random.Generator | None, s: SymbolSettings) -> np.ndarray:
    """A user symbol (3,H,W) uint8 -> (3,S,S) float32 under the same random affine map as drawn ones."""
    pil = Image.fromarray(img.transpose(1, 2, 0))
    augment = rng is not None
    rng = rng if augment else np.random.default_rng(0)
    matrix, offset, _ = _random_affine(rng, s, augment)
    if augment:  # PIL wants the inverse map output -> input, in pixels about the centre
        h = pil.size[0] / 2.0
        flip = np.diag([1.0, -1.0])  # unit y is up, pixel y is down
        inv = np.linalg.inv(flip @ matrix @ flip)
        c = np.array([h, h]) - inv @ (np.array([h, h]) + flip @ offset * h * 0.95)
        pil = pil.transform(pil.size, Image.Transform.AFFINE, (inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1]),
                            resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
    pil = pil.resize((s.size, s.size), Image.Resampling.BILINEAR)
    rgb = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0
    if augment:
        rgb = rgb * rng.uniform(*s.brightness_range)
        if s.noise > 0:
            rgb = rgb + rng.normal(0.0, s.noise, size=rgb.shape)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The symbol set of a vocabulary

_PROTOTYPE_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


@dataclass
class SymbolSet:
    """The symbols of every class of a vocabulary: drawn, or the user's images (uint8, 2x the output size)."""

    keys: list[str]
    settings: SymbolSettings = field(default_factory=SymbolSettings)
    user_images: np.ndarray | None = None      # (M, 3, H, W) uint8
    user_labels: np.ndarray | None = None      # (M,) int64 class index
    user_hash: str | None = None
    source: str | None = None                  # the folder the user images came from (informational)

    def __post_init__(self) -> None:
        covered = set() if self.user_labels is None else {self.keys[i] for i in np.unique(self.user_labels)}
        missing = [k for k in self.keys if k not in covered and k not in DRAWERS]
        if missing:
            raise ConfigError(f"no symbols for class(es) {', '.join(missing)}: the built-in drawer does not know them; "
                              f"supply images with --symbols DIR (one subfolder or file prefix per class key)")
        self._user_index = {} if self.user_labels is None else {
            i: np.flatnonzero(self.user_labels == i) for i in range(len(self.keys))}
        self._user_index = {i: v for i, v in self._user_index.items() if len(v)}
        if self.user_images is not None and self.user_hash is None:
            digest = hashlib.sha256(np.ascontiguousarray(self.user_images).tobytes())
            digest.update(np.ascontiguousarray(self.user_labels).tobytes())
            self.user_hash = digest.hexdigest()[:16]

    @classmethod
    def builtin(cls, vocab: Vocabulary, size: int, **settings) -> "SymbolSet":
        return cls(vocab.keys, SymbolSettings(size=size, **settings))

    @classmethod
    def from_folder(cls, folder: str | Path, vocab: Vocabulary, size: int, **settings) -> "SymbolSet":
        files = find_user_symbols(folder, vocab.keys)
        if not files:
            raise ConfigError(f"--symbols {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) for any class")
        images, labels, digest = [], [], hashlib.sha256()
        for key in vocab.keys:
            for path in files.get(key, []):
                images.append(_load_rgb(path, 2 * size))
                labels.append(vocab.keys.index(key))
                digest.update(key.encode() + b"\0" + path.read_bytes())
        return cls(vocab.keys, SymbolSettings(size=size, **settings), np.stack(images), np.asarray(labels, np.int64),
                   digest.hexdigest()[:16], str(folder))

    def render(self, class_index: int, rng: np.random.Generator | None = None, variant: int = 0) -> np.ndarray:
        """One symbol of class ``class_index`` (3,S,S) float32; canonical (unaugmented) when ``rng`` is None."""
        users = self._user_index.get(class_index)
        if users is not None:
            pick = users[variant % len(users)] if rng is None else rng.choice(users)
            return _augment_user(self.user_images[pick], rng, self.settings)
        return draw_symbol(self.keys[class_index], self.settings, rng)

    def render_batch(self, class_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented symbols for each class id, (N,3,S,S) float32."""
        return np.stack([self.render(int(c), rng) for c in class_ids])

    def bank(self, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``per_class`` augmented symbols of every class: images (K*per_class,3,S,S), labels."""
        rng = np.random.default_rng(seed)
        labels = np.repeat(np.arange(len(self.keys)), per_class)
        return self.render_batch(labels, rng), labels

    def prototype_images(self, per_class: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The canonical symbol(s) plus ``per_class - 1`` augmented ones per class, deterministic in ``seed``."""
        key = (self.settings, tuple(self.keys), self.user_hash, per_class, seed)
        if key not in _PROTOTYPE_CACHE:  # deterministic renders: shared by every SymbolSet alike
            if len(_PROTOTYPE_CACHE) >= 8:
                _PROTOTYPE_CACHE.pop(next(iter(_PROTOTYPE_CACHE)))
            _PROTOTYPE_CACHE[key] = self._prototype_images(per_class, seed)
        return _PROTOTYPE_CACHE[key]

    def _prototype_images(self, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        images, labels = [], []
        for i in range(len(self.keys)):
            n_canon = len(self._user_index.get(i, [0]))
            for v in range(min(n_canon, per_class)):
                images.append(self.render(i, None, variant=v))
                labels.append(i)
            for _ in range(per_class - min(n_canon, per_class)):
                images.append(self.render(i, rng))
                labels.append(i)
        return np.stack(images), np.asarray(labels, np.int64)

    def to_dict(self) -> dict:
        d = {"settings": self.settings.to_dict(), "keys": list(self.keys),
             "drawn": [k for i, k in enumerate(self.keys) if i not in self._user_index]}
        if self.user_labels is not None:
            d.update(user_hash=self.user_hash, user_source=self.source, user_count=int(len(self.user_labels)))
        return d

    @classmethod
    def from_dict(cls, d: dict, user_images: np.ndarray | None = None, user_labels: np.ndarray | None = None) -> "SymbolSet":
        return cls(list(d["keys"]), SymbolSettings.from_dict(d["settings"]), user_images, user_labels,
                   d.get("user_hash"), d.get("user_source"))
