"""Which tiles a run covers: files, directories, globs, @lists and Legacy Survey roots."""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits", ".fits.fz", ".fit", ".fts", ".fits.gz")
#: Legacy Survey products that are never tiles: a brick's other coadd products (model, resid, chi2, nexp,
#: depth, galdepth, psfsize, ccds, blobmodel, ...; invvar and maskbits are read with their image), catalogues
#: (tractor, sweep, survey-bricks, ccds) beside the images of a release tree
_PRODUCT_RE = re.compile(r"^(legacysurvey-\d{4}[pm]\d{3}-|tractor-|sweep-|survey-(bricks|ccds)|ccds-|annotated-ccds)", re.I)


@dataclass(frozen=True, order=True)
class TileRef:
    """One unit of work. ``name`` is the store's key for the tile (:func:`tile_key`)."""

    name: str
    path: str  # cutout-cube file, a file of a loose brick, or the (resolved) survey root for a brick
    brick: str | None = None

    @property
    def is_brick(self) -> bool:
        return self.brick is not None


def brick_key(root: str | os.PathLike, brick: str) -> str:
    """The key of brick ``brick`` of the survey tree at ``root``: its resolved coadd folder.

    ``/data/dr10/south/coadd/150/1501p022``: the resolved path names the root (so the same brick
    name under a north and a south root gives two tiles) and the brick; a symlinked or differently
    spelled root gives the same key.
    """
    from galaxalign_batch.survey import layout

    return os.fspath(layout.coadd_dir(os.path.realpath(os.fspath(root)), brick))


def tile_key(path: str | os.PathLike, brick: str | None = None) -> str:
    """The store key of a tile: :func:`brick_key` for a brick of a survey tree (``path`` its root);
    for a file, its resolved absolute path, or for a loose brick file (outside a tree) its resolved
    folder joined with the brick name. Keys are stable: the same file or brick always has the same key,
    whatever path, symlink or other tiles named it."""
    from galaxalign_batch.survey.layout import parse_brick_filename

    if brick is not None:
        return brick_key(path, brick)
    real = os.path.realpath(os.fspath(path))
    parsed = parse_brick_filename(real)
    if parsed is None:
        return real
    folder = os.path.dirname(real)
    return folder if os.path.basename(folder) == parsed["brick"] else os.path.join(folder, parsed["brick"])


def _is_fits(p: str) -> bool:
    return p.lower().endswith(FITS_SUFFIXES)


def _expand_one(spec: str) -> list[str]:
    if spec.startswith("@"):
        listing = Path(spec[1:])
        if not listing.is_file():
            raise ConfigError(f"{listing}: list file not found")
        out: list[str] = []
        for line in listing.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.extend(_expand_one(line))
        return out
    if any(ch in spec for ch in "*?["):
        hits = sorted(glob.glob(spec, recursive=True))
        if not hits:
            raise ConfigError(f"{spec}: the pattern matches no file")
        return hits
    if not os.path.exists(spec):
        raise ConfigError(f"{spec}: no such file or directory")
    return [spec]


def is_product(path: str) -> bool:
    """A Legacy Survey file that is not a tile by itself: anything of a brick but its ``-image-<band>``
    files (model, resid, chi2, nexp, depth, invvar, maskbits, ...) and the release's catalogues."""
    from galaxalign_batch.survey.layout import parse_brick_filename

    name = os.path.basename(path)
    parsed = parse_brick_filename(name)
    return parsed["kind"] != "image" if parsed is not None else bool(_PRODUCT_RE.match(name))


def _add_file(refs: dict[str, TileRef], path: str) -> int:
    """A cutout cube is its own tile; the files of one Legacy Survey brick (bands, invvar, maskbits)
    are one tile, opened through any of its image files. Other Legacy Survey products and catalogues
    are skipped (returns 1)."""
    from galaxalign_batch.survey.layout import parse_brick_filename

    real = os.path.realpath(path)
    if is_product(real):
        return 1
    parsed = parse_brick_filename(real)
    if parsed is None:
        refs.setdefault(real, TileRef(real, real))
    else:
        refs.setdefault(tile_key(real), TileRef(tile_key(real), real))
    return 0


def survey_regions(path: str) -> list[str]:
    """The survey roots directly inside a release folder (DR9/DR10: ``north/`` and ``south/``), sorted."""
    from galaxalign_batch.survey import layout

    try:
        subs = sorted(os.path.join(path, d) for d in os.listdir(path))
    except OSError:
        return []
    return [d for d in subs if os.path.isdir(d) and layout.is_survey_root(d)]


def resolve_tiles(paths: Sequence[str], bricks: Iterable[str] | None = None, *,
                  image_columns: dict | None = None) -> list[TileRef]:
    """Expand ``--tiles`` arguments (and ``--bricks``) into a sorted, de-duplicated list of tiles.

    - a Legacy Survey root (has ``coadd/``): its bricks (all, or those named in ``bricks``);
    - a release folder whose regions are roots (DR9/DR10 ``north/`` and ``south/``): every region's bricks;
    - a directory of FITS files: each file is a tile (searched recursively; Legacy Survey products other
      than ``-image-<band>`` files and catalogues are skipped); PNG/JPEG pictures beside them are skipped
      with a warning (previews of the same galaxies), a directory of pictures alone gives its pictures;
    - a FITS file, a PNG/JPEG picture, a CSV listing pictures (:func:`~galaxalign_batch.survey.images.read_image_csv`;
      ``image_columns`` may name its ``id_col``, ``ra_col``, ``dec_col``, ``file_col``), a glob, or
      ``@list.txt`` (one path or pattern per line, ``#`` comments).

    Tiles are identified by :func:`tile_key`: a file reached through a symlink or another spelling
    is one tile; the same brick name under two roots is two tiles. A picture is a
    :class:`~galaxalign_batch.survey.images.ImageRef` (one source, keyed by its resolved path).
    """
    from galaxalign_batch.survey import images, layout

    wanted = set(bricks) if bricks else None
    refs: dict[str, TileRef] = {}
    skipped = 0

    def add_root(p: str) -> None:
        present = layout.list_bricks(p)
        names = present if wanted is None else sorted(wanted & set(present))
        root = os.path.realpath(p)
        for b in names:
            key = brick_key(root, b)
            refs.setdefault(key, TileRef(key, root, b))

    for spec in paths:
        for p in _expand_one(os.fspath(spec)):
            if os.path.isdir(p) and layout.is_survey_root(p):
                if wanted is not None and (missing := wanted - set(layout.list_bricks(p))):
                    raise ConfigError(f"{p}: no such brick(s): {', '.join(sorted(missing))}")
                add_root(p)
            elif os.path.isdir(p) and (regions := survey_regions(p)):
                log.info("%s: a release with region(s) %s", p, ", ".join(os.path.basename(r) for r in regions))
                if wanted is not None and (missing := wanted - {b for r in regions for b in layout.list_bricks(r)}):
                    raise ConfigError(f"{p}: no such brick(s) in {', '.join(map(os.path.basename, regions))}: "
                                      f"{', '.join(sorted(missing))}")
                for r in regions:
                    add_root(r)
            elif os.path.isdir(p):
                under = images.files_under(p)   # one walk for both kinds (a survey folder can hold 10^5 files)
                files = sorted(f for f in under if _is_fits(f))
                for f in files:
                    skipped += _add_file(refs, f)
                found = [f for f in under if images.is_picture(f)]
                if files and found:
                    # previews beside cubes (Galaxy Zoo subjects, viewer JPEGs) would be second rows of the
                    # same galaxies, without positions: a folder of FITS gives its FITS
                    log.warning("%s: skipped %d PNG/JPEG picture(s) beside its FITS tiles; to embed them "
                                "too, name them or a glob (e.g. '%s')", p, len(found),
                                os.path.join(p, "**", "*.png"))
                    found = []
                for f in found:
                    ref = images.picture_ref(f)
                    refs.setdefault(ref.name, ref)
            elif images.is_picture(p):
                ref = images.picture_ref(p)
                refs.setdefault(ref.name, ref)
            elif images.is_csv(p):
                for ref in images.read_image_csv(p, **(image_columns or {})):
                    refs.setdefault(ref.name, ref)
            else:
                if not _is_fits(p):
                    raise ConfigError(f"{p}: not a FITS file, a PNG/JPEG picture or a CSV of pictures (expected "
                                      f"one of {', '.join(FITS_SUFFIXES + images.IMAGE_SUFFIXES + images.CSV_SUFFIXES)})")
                skipped += _add_file(refs, p)
    if skipped:
        log.info("skipped %d Legacy Survey product/catalogue file(s) that are not image tiles", skipped)
    if wanted is not None and not any(r.is_brick for r in refs.values()):
        raise ConfigError("--bricks given but no --tiles path is a Legacy Survey root (a folder with coadd/)")
    if not refs:
        raise ConfigError(f"no tiles found in {', '.join(map(str, paths))}")
    images.check_unique_ids([r for r in refs.values() if isinstance(r, images.ImageRef)])
    return sorted(refs.values(), key=lambda r: r.name)
