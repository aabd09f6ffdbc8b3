"""Class vocabularies: versioned TOML files of classes, label texts and prompt templates."""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from galaxalign_batch.errors import ConfigError

DEFAULT_VOCABULARY = "galaxy10"


@dataclass(frozen=True)
class GalaxyClass:
    key: str
    label: str
    templates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of classes; the index of a class is its integer label."""

    name: str
    version: int
    classes: tuple[GalaxyClass, ...]
    templates: tuple[str, ...] = field(default=("a photo of a {} galaxy.",))

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    def index(self, key_or_label: str) -> int:
        """Integer label of a class given by key or label text (case-insensitive)."""
        k = key_or_label.strip().lower()
        for i, c in enumerate(self.classes):
            if k in (c.key.lower(), c.label.lower()):
                return i
        raise ConfigError(f"unknown class {key_or_label!r}; vocabulary {self.name!r} has: {', '.join(self.keys)}")

    def prompts(self, i: int) -> list[str]:
        """All prompt texts of class ``i`` (its own templates, else the vocabulary's)."""
        c = self.classes[i]
        return [t.format(c.label) for t in (c.templates or self.templates)]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "templates": list(self.templates),
            "classes": [{"key": c.key, "label": c.label, **({"templates": list(c.templates)} if c.templates else {})}
                        for c in self.classes],
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Vocabulary":
        try:
            templates = tuple(d.get("templates", ("a photo of a {} galaxy.",)))
            classes = tuple(GalaxyClass(str(c["key"]), str(c.get("label", c["key"])), tuple(c.get("templates", ())))
                            for c in d["classes"])
            vocab = cls(str(d.get("name", "custom")), int(d.get("version", 1)), classes, templates)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not a valid vocabulary ({e!r}); see docs/vocabulary.md") from None
        if len(classes) < 2:
            raise ConfigError(f"{source}: a vocabulary needs at least 2 classes, found {len(classes)}")
        if len({c.key for c in classes}) != len(classes):
            raise ConfigError(f"{source}: duplicate class keys")
        for t in templates + tuple(t for c in classes for t in c.templates):
            if "{}" not in t:
                raise ConfigError(f"{source}: template {t!r} has no '{{}}' for the label")
        return vocab

    def digest(self) -> str:
        """Short content hash, stored with checkpoints and embedding stores."""
        return hashlib.sha256(repr(self.to_dict()).encode()).hexdigest()[:16]


def load_vocabulary(spec: str | os.PathLike = DEFAULT_VOCABULARY) -> Vocabulary:
    """Load a vocabulary by built-in name (``galaxy10``) or from a TOML file path."""
    spec = os.fspath(spec)
    if os.path.exists(spec):
        with open(spec, "rb") as f:
            try:
                return Vocabulary.from_dict(tomllib.load(f), spec)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{spec}: not valid TOML ({e})") from None
    ref = resources.files("galaxalign_batch") / "data" / f"{spec}.toml"
    if not ref.is_file():
        raise ConfigError(f"no vocabulary file or built-in vocabulary named {spec!r} (built-in: galaxy10)")
    with ref.open("rb") as f:
        return Vocabulary.from_dict(tomllib.load(f), f"galaxalign_batch/data/{spec}.toml")
