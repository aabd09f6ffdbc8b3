"""`galaxalign-batch cutout`: a picture of the sky at (RA, Dec) from tiles, north up, east left.

What a user reaches for to look at a galaxy, and the tool by which a person checks orientation and
stretch: the picture is made by the same code (``preprocess.make_cutouts`` with the tile's WCS) that
cuts what ``train`` and ``embed`` feed the model.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
from pathlib import Path

from galaxalign_batch.cli import _options as opt
from galaxalign_batch.errors import ConfigError, GalaxAlignError

log = logging.getLogger(__name__)

def _targets(path: Path) -> list[tuple[str, float, float]]:
    """(name, ra, dec) rows of a CSV (columns ra, dec and optionally name / object_id / id) or of a
    FITS / ECSV / parquet table readable by astropy."""
    if not path.is_file():
        raise ConfigError(f"{path}: targets file not found")
    if path.suffix.lower() in (".csv", ".txt"):
        with open(path, newline="") as f:
            rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]
    else:
        from astropy.table import Table

        try:
            t = Table.read(path)
        except Exception as e:
            raise ConfigError(f"{path}: cannot read the targets table ({e})") from None
        rows = [{k.lower(): r[k] for k in t.colnames} for r in t]
    out = []
    for i, r in enumerate(rows):
        if "ra" not in r or "dec" not in r:
            raise ConfigError(f"{path}: the targets need columns ra and dec (degrees); found {', '.join(r) or 'none'}")
        try:
            ra, dec = float(r["ra"]), float(r["dec"])
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: row {i + 1}: ra / dec are not numbers: {r['ra']!r}, {r['dec']!r}") from None
        name = next((str(r[k]) for k in ("name", "object_id", "id") if k in r and str(r[k]).strip()), f"target{i:05d}")
        out.append((name, ra, dec))
    if not out:
        raise ConfigError(f"{path}: no targets")
    return out


def _file_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")
    return (safe or "target")[:120]


class _Tiles:
    """The tiles named by ``--tiles``; bricks of survey roots are opened only when a target is on them."""

    def __init__(self, specs: list[str]):
        from galaxalign_batch.survey.tiles import resolve_tiles

        self.refs = resolve_tiles(specs)
        if not self.refs:
            raise ConfigError(f"--tiles {' '.join(specs)}: no tiles found")
        self._open: dict[str, object] = {}

    def _tile(self, ref):
        """The open tile, or None (with one warning) when it cannot be read: other tiles may hold the target."""
        if ref.name not in self._open:
            from galaxalign_batch.engine.prepare import read_tile
            from galaxalign_batch.errors import TileError

            try:
                self._open[ref.name] = read_tile(ref)
            except TileError as e:
                log.warning("skipping a tile: %s", e)
                self._open[ref.name] = None
        return self._open[ref.name]

    def candidates(self, ra: float, dec: float):
        """Open tiles whose image holds (ra, dec), with its pixel position."""
        from galaxalign_batch.survey import layout

        info = layout.brick_at(ra, dec)
        near = {info.brickname}
        for dra in (-0.01, 0.01):  # a neighbouring brick's image overlaps the brick by ~0.01 deg
            for ddec in (-0.01, 0.0, 0.01):
                d = max(-90.0, min(90.0, dec + ddec))
                near.add(layout.brick_at((ra + dra / max(math.cos(math.radians(d)), 1e-3)) % 360.0, d).brickname)
        for ref in self.refs:
            if ref.is_brick and ref.brick not in near:
                continue
            tile = self._tile(ref)
            if tile is None:
                continue
            x, y = tile.world_to_pixel(ra, dec)
            if math.isfinite(x) and math.isfinite(y) and bool(tile.contains(x, y)):
                yield tile, float(x), float(y)


def cut(tiles: _Tiles, ra: float, dec: float, spec):
    """(uint8 (S, S, 3) picture, tile, x, y, masked fraction) from the tile with the least masked
    footprint (to 0.001); among those, the finest pixel scale."""
    import numpy as np

    from galaxalign_batch.preprocess import make_cutouts

    best = None
    for tile, x, y in tiles.candidates(ra, dec):
        batch = make_cutouts(tile.image, tile.valid, [x], [y], tile.pixscale, spec, bands=tile.bands, wcs=tile.wcs)
        masked = float(batch.masked_fraction[0])
        key = (round(masked, 3), tile.pixscale)
        if best is None or key < best[5]:
            best = (np.ascontiguousarray(batch.pixels[0].transpose(1, 2, 0)), tile, x, y, masked, key)
    if best is None:
        raise ConfigError(f"RA {ra:.6f}, Dec {dec:.6f} is on none of the tiles")
    return best[:5]


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from galaxalign_batch.preprocess import CutoutSpec

    spec = CutoutSpec(angular_size=args.angular_size, out_size=args.pixels, stretch=args.stretch, dtype="uint8",
                      orientation=args.orientation)
    if args.targets is not None:
        if args.ra is not None or args.dec is not None:
            raise opt.UsageError("give either --ra/--dec or --targets, not both")
        targets = _targets(Path(args.targets))
        out_dir = Path(args.out)
        if out_dir.suffix.lower() == ".png":
            raise ConfigError(f"--targets writes one picture per target: --out must be a folder, got {out_dir}")
        out_dir.mkdir(parents=True, exist_ok=True)
        names: dict[str, int] = {}
        jobs = []
        for name, ra, dec in targets:
            stem = _file_name(name)
            names[stem] = names.get(stem, 0) + 1
            unique = stem if names[stem] == 1 else f"{stem}-{names[stem]}"
            jobs.append((name, ra, dec, out_dir / f"{unique}.png"))
    else:
        if args.ra is None or args.dec is None:
            raise opt.UsageError("give --ra and --dec (degrees), or --targets FILE")
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise ConfigError(f"--out must name a .png file, got {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs = [(f"{args.ra},{args.dec}", args.ra, args.dec, out)]
    tiles = _Tiles(args.tiles)
    failed = 0
    for name, ra, dec, path in jobs:
        if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
            log.error("%s: bad position RA %r, Dec %r", name, ra, dec)
            failed += 1
            continue
        try:
            picture, tile, x, y, masked = cut(tiles, ra % 360.0, dec, spec)
        except GalaxAlignError as e:
            if len(jobs) == 1:
                raise
            log.error("%s: %s", name, e)
            failed += 1
            continue
        Image.fromarray(picture, mode="RGB").save(path)
        print(f"{path}  {name}  tile {tile.name}  x {x:.2f} y {y:.2f}  {tile.pixscale:.4f}\"/px -> "
              f"{spec.out_pixscale:.4f}\"/px  masked {masked:.3f}  {spec.stretch} {spec.orientation}")
    if failed:
        log.error("%d of %d targets not cut", failed, len(jobs))
        return 3
    return 0


def register(sub) -> None:
    p = sub.add_parser("cutout", help="a picture of the sky at RA, Dec from tiles (north up, east left)",
                       description="Cut a picture of --angular-size arcsec around RA, Dec from the tile that holds it "
                                   "(least masked, if several), resampled to --pixels and stretched as the "
                                   "model sees it; north up, east left from the tile's WCS.")
    opt.add_tiles(p, required=True)
    p.add_argument("--ra", type=float, help="degrees")
    p.add_argument("--dec", type=float, help="degrees")
    p.add_argument("--targets", help="CSV (columns ra, dec, optional name / object_id / id) or FITS table: "
                                     "one picture per row into the folder --out")
    opt.add_angular_size(p, help="side of the picture, arcsec")
    opt.add_deprecated_alias(p, "--size", "--angular-size", "angular_size", type=float)
    p.add_argument("--pixels", type=int, default=256, help="side of the picture, pixels (default 256)")
    opt.add_stretch(p)
    p.add_argument("--orientation", default="north-up", choices=["north-up", "fits"],
                   help="north-up (east left, from the WCS; default) or fits (array order: the file's first row at the top)")
    p.add_argument("--out", required=True, help="picture.png, or a folder with --targets")
    p.set_defaults(func=run)
