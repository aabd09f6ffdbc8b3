"""`CutoutSpec`: what a cutout is (field of view, size, stretch, dtype), recorded with every result."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from galaxalign_batch.errors import ConfigError

STRETCHES = ("lupton", "asinh", "gz-decals", "none")
PICTURE_STRETCHES = STRETCHES[:3]  # the picture conventions ("none" is linear flux, no picture)
# "north-up": row 0 is north, column 0 east (as the Legacy Survey viewer, Galaxy Zoo and Galaxy10
# show them), derived from the tile's WCS; "fits": rows and columns in the tile's array order (row 0 =
# FITS row 1, i.e. south for Legacy Survey bricks), the convention before orientation was recorded.
ORIENTATIONS = ("north-up", "fits")
LEGACY_ORIENTATION = "fits"  # what a recorded spec without an ``orientation`` field was cut with
DTYPES = ("float32", "float16", "uint8")
MAX_OUT_SIZE = 4096

# Legacy Survey viewer RGB (legacypipe `sdss_rgb`): RGB plane of each band (0 = R, 1 = G, 2 = B),
# the multiplier applied to nanomaggies, the offset m and the arcsinh Q.
VIEWER_PLANES = {"g": 2, "r": 1, "z": 0}
VIEWER_SCALES = {"g": 6.0, "r": 3.4, "z": 2.2}
VIEWER_M = 0.03
VIEWER_Q = 20.0
# Per-band asinh defaults, derived from the viewer's constants (see docs/preprocess.md):
# softening = 1 / (Q * scale) and white point = sinh(sqrt(Q)) / (Q * scale), rounded to 3 digits; nanomaggies.
ASINH_SOFTENING = {"g": 0.00833, "r": 0.0147, "z": 0.0227}
ASINH_MAX = {"g": 0.365, "r": 0.644, "z": 0.995}
# Galaxy Zoo DECaLS subject images (zooniverse/decals make_png_from_fits -> dr2_style_rgb): per band
# asinh(f / scale), black at asinh(-0.5), white at asinh(300), then desaturation of single-colour pixels.
GZ_SCALES = {"g": 0.008, "r": 0.014, "z": 0.019}
GZ_MIN = -0.5
GZ_MAX = 300.0

BandMap = tuple[tuple[str, float], ...]


def _band_map(name: str, value: Any, *, integer: bool = False) -> tuple:
    """Normalise a {band: number} mapping (or sequence of pairs) into a hashable tuple of pairs."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"CutoutSpec.{name} must map band names to numbers, got {value!r}") from None
    out = []
    for band, number in pairs:
        if not isinstance(band, str) or not band:
            raise ConfigError(f"CutoutSpec.{name}: band names must be non-empty strings, got {band!r}")
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"CutoutSpec.{name}[{band!r}] must be a number, got {number!r}")
        if integer and int(number) != number:
            raise ConfigError(f"CutoutSpec.{name}[{band!r}] must be an integer, got {number!r}")
        out.append((band, int(number) if integer else float(number)))
    if len({b for b, _ in out}) != len(out):
        raise ConfigError(f"CutoutSpec.{name} names a band twice: {value!r}")
    return tuple(out)


@dataclass(frozen=True)
class CutoutSpec:
    """A cutout of fixed angular size, resampled to ``out_size`` pixels and stretched.

    - ``angular_size``: side of the cutout in arcsec; ``out_size``: side in output pixels.
    - ``stretch``: ``"lupton"`` (Legacy Survey viewer RGB, legacypipe ``sdss_rgb``), ``"asinh"``
      (independent per-band asinh) or ``"none"`` (resampled nanomaggies, channels in band order).
    - ``band_planes``: RGB plane of each band (0 = R, 1 = G, 2 = B); viewer: z->R, r->G, g->B.
    - ``lupton_scales`` / ``lupton_m`` / ``lupton_q``: the viewer's band multipliers, offset and Q.
    - ``asinh_softening`` / ``asinh_max``: per band, nanomaggies: v = asinh(f/soft) / asinh(max/soft).
    - ``"gz-decals"`` stretch (Galaxy Zoo DECaLS images): ``gz_scales`` (per band divisor, nanomaggies),
      ``gz_min`` / ``gz_max`` (black / white before the asinh) and ``gz_desaturate``.
    - ``orientation``: ``"north-up"`` (north up, east left, from the WCS) or ``"fits"`` (array order).
      ``from_dict`` of a record without the field gives ``"fits"``: what old stores and checkpoints used.
    - ``dtype``: ``"float32"`` / ``"float16"`` (values in [0, 1]) or ``"uint8"`` (0..255).
    - ``fill``: output value (in output units before uint8 scaling) of a pixel whose band has no
      valid data at all.
    """

    angular_size: float = 32.0
    out_size: int = 64
    stretch: str = "lupton"
    band_planes: tuple[tuple[str, int], ...] = tuple(VIEWER_PLANES.items())
    lupton_scales: BandMap = tuple(VIEWER_SCALES.items())
    lupton_m: float = VIEWER_M
    lupton_q: float = VIEWER_Q
    asinh_softening: BandMap = tuple(ASINH_SOFTENING.items())
    asinh_max: BandMap = tuple(ASINH_MAX.items())
    dtype: str = "float32"
    fill: float = 0.0
    gz_scales: BandMap = tuple(GZ_SCALES.items())
    gz_min: float = GZ_MIN
    gz_max: float = GZ_MAX
    gz_desaturate: bool = True
    orientation: str = "north-up"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("angular_size", _finite("angular_size", self.angular_size))
        if self.angular_size <= 0:
            raise ConfigError(f"CutoutSpec.angular_size must be > 0 arcsec, got {self.angular_size}")
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int) or not 1 <= self.out_size <= MAX_OUT_SIZE:
            raise ConfigError(f"CutoutSpec.out_size must be an integer in 1..{MAX_OUT_SIZE}, got {self.out_size!r}")
        if self.stretch not in STRETCHES:
            raise ConfigError(f"CutoutSpec.stretch must be one of {', '.join(STRETCHES)}, got {self.stretch!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"CutoutSpec.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.stretch == "none" and self.dtype == "uint8":
            raise ConfigError("CutoutSpec: stretch 'none' gives nanomaggies; use dtype float32 or float16, not uint8")
        put("fill", _finite("fill", self.fill))
        if self.stretch != "none" and not 0.0 <= self.fill <= 1.0:
            raise ConfigError(f"CutoutSpec.fill must be in [0, 1] for stretch {self.stretch!r}, got {self.fill}")
        put("band_planes", _band_map("band_planes", self.band_planes, integer=True))
        for band, plane in self.band_planes:
            if plane not in (0, 1, 2):
                raise ConfigError(f"CutoutSpec.band_planes[{band!r}] must be 0 (R), 1 (G) or 2 (B), got {plane}")
        if self.orientation not in ORIENTATIONS:
            raise ConfigError(f"CutoutSpec.orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}")
        if not isinstance(self.gz_desaturate, bool):
            raise ConfigError(f"CutoutSpec.gz_desaturate must be true or false, got {self.gz_desaturate!r}")
        put("gz_min", _finite("gz_min", self.gz_min))
        put("gz_max", _finite("gz_max", self.gz_max))
        if not self.gz_max > self.gz_min:
            raise ConfigError(f"CutoutSpec.gz_max must be > gz_min, got {self.gz_min}..{self.gz_max}")
        for name in ("lupton_scales", "asinh_softening", "asinh_max", "gz_scales"):
            put(name, _band_map(name, getattr(self, name)))
            for band, v in getattr(self, name):
                if not (math.isfinite(v) and v > 0):
                    raise ConfigError(f"CutoutSpec.{name}[{band!r}] must be finite and > 0, got {v}")
        put("lupton_m", _finite("lupton_m", self.lupton_m))
        put("lupton_q", _finite("lupton_q", self.lupton_q))
        if self.lupton_q <= 0:
            raise ConfigError(f"CutoutSpec.lupton_q must be > 0, got {self.lupton_q}")

    @property
    def out_pixscale(self) -> float:
        """Arcsec per output pixel."""
        return self.angular_size / self.out_size

    def step(self, pixscale: float) -> float:
        """Footprint of one output pixel in input pixels, for an input of ``pixscale`` arcsec/px."""
        return self.out_pixscale / pixscale

    def band_parameters(self, bands: tuple[str, ...]) -> tuple[list[int], list[float], list[float]]:
        """(planes, p1, p2) per band for the kernel: lupton scale, asinh softening / max or gz-decals scale."""
        bands = tuple(bands)
        if not 1 <= len(bands) <= 3:
            raise ConfigError(f"cutouts take 1 to 3 bands, got {len(bands)}: {bands}")
        if len(set(bands)) != len(bands):
            raise ConfigError(f"bands must be distinct, got {bands}")
        if self.stretch == "none":
            return list(range(len(bands))), [1.0] * len(bands), [1.0] * len(bands)
        planes_map = dict(self.band_planes)
        if self.stretch == "lupton":
            tables = {"lupton_scales": dict(self.lupton_scales)}
        elif self.stretch == "gz-decals":
            tables = {"gz_scales": dict(self.gz_scales)}
        else:
            tables = {"asinh_softening": dict(self.asinh_softening), "asinh_max": dict(self.asinh_max)}
        for name, table in [("band_planes", planes_map), *tables.items()]:
            missing = [b for b in bands if b not in table]
            if missing:
                raise ConfigError(f"CutoutSpec.{name} has no entry for band(s) {', '.join(missing)}")
        planes = [planes_map[b] for b in bands]
        if len(set(planes)) != len(planes):
            raise ConfigError(f"CutoutSpec.band_planes maps bands {bands} onto the same RGB plane: {planes}")
        if self.stretch == "lupton":
            return planes, [tables["lupton_scales"][b] for b in bands], [1.0] * len(bands)
        if self.stretch == "gz-decals":
            return planes, [tables["gz_scales"][b] for b in bands], [1.0] * len(bands)
        return planes, [tables["asinh_softening"][b] for b in bands], [tables["asinh_max"][b] for b in bands]

    def to_dict(self) -> dict:
        """JSON-friendly dict (band maps as objects); ``from_dict(to_dict())`` gives an equal spec."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = dict(v) if isinstance(v, tuple) else v
        return out

    @property
    def orientation_recorded(self) -> bool:
        """False for a spec read by ``from_dict`` from a record that had no ``orientation`` field."""
        return self.__dict__.get("_orientation_recorded", True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CutoutSpec":
        """The spec a record describes. A record without ``orientation`` (written before the field
        existed) was cut in array order: it gets ``orientation="fits"`` and ``orientation_recorded``
        False, so a model trained on such cutouts keeps being fed what it saw."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"CutoutSpec.from_dict needs a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CutoutSpec field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        recorded = "orientation" in d
        d.setdefault("orientation", LEGACY_ORIENTATION)
        spec = cls(**d)
        if not recorded:
            object.__setattr__(spec, "_orientation_recorded", False)
        return spec


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"CutoutSpec.{name} must be a finite number, got {value!r}")
    return float(value)


def check_stretch_augment(own: str, others) -> tuple[str, ...]:
    """``--stretch-augment``'s stretches as a tuple: picture stretches other than the model's ``own``, each once."""
    others = tuple(str(x) for x in (others or ()))
    if any(x not in PICTURE_STRETCHES for x in others) or len(set(others)) != len(others) or own in others:
        raise ConfigError(f"--stretch-augment must name other stretches than the model's {own}, each once, "
                          f"from {', '.join(PICTURE_STRETCHES)}; got {','.join(others)}")
    return others
