"""Target lists: RA/Dec tables (CSV, FITS, Parquet) read, hashed and assigned to the tiles that hold them.

``embed --targets FILE`` embeds a cutout centred on each listed position instead of every catalogue
source. Each target goes to exactly one tile:

1. its **primary brick**, the brick whose unique area holds it (the ``survey-bricks.fits`` grid,
   :func:`galaxalign_batch.survey.layout.brick_name`; the same rule as Tractor's ``brick_primary``),
   when that brick is part of the run and its image holds the position. So a target in the overlap
   of two neighbouring bricks is embedded once, from the brick that owns it;
2. otherwise (the primary brick is not in the run, or its image is smaller than the cell), the tile
   of the run (a brick or a cutout cube) whose image holds it farthest from an edge;
3. otherwise it is **outside every tile**: counted in the summary and listed in a CSV file, never
   dropped silently. Rows without a usable position are listed there too.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from galaxalign_batch import atomic
from galaxalign_batch.errors import ConfigError, TileError

log = logging.getLogger(__name__)

#: prefix of the object id of a target row (``target/<target_id>``)
ID_PREFIX = "target/"


@dataclass
class Targets:
    """A target list: positions (ICRS degrees; NaN where a row has none), ids and kept columns."""

    path: str
    sha256: str
    ra: np.ndarray
    dec: np.ndarray
    ids: np.ndarray  # str: the --id-col value, else the 0-based row number
    ra_col: str
    dec_col: str
    id_col: str | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # other columns (for --keep-columns)

    def __len__(self) -> int:
        return len(self.ra)

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.ra) & np.isfinite(self.dec)

    def identity(self) -> dict:
        """What the store records of the selection (a resumed run must give the same)."""
        return {"kind": "targets", "file": os.path.abspath(self.path), "sha256": self.sha256, "rows": len(self),
                "ra_col": self.ra_col, "dec_col": self.dec_col, "id_col": self.id_col}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _column_values(table, name: str) -> np.ndarray:
    import pyarrow as pa

    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type):
        return np.array(["" if v is None else str(v) for v in col.to_pylist()], dtype=str)
    if pa.types.is_boolean(col.type):
        return np.array([bool(v) if v is not None else False for v in col.to_pylist()])
    if pa.types.is_integer(col.type) and col.null_count == 0:
        return np.asarray(col.to_numpy(zero_copy_only=False))
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_decimal(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls -> NaN
    return np.array(["" if v is None else str(v) for v in col.to_pylist()], dtype=str)


def read_targets(path: str | os.PathLike, ra_col: str | None = None, dec_col: str | None = None,
                 id_col: str | None = None, fmt: str | None = None) -> Targets:
    """Read a target list. RA/Dec columns are found by name (RA/DEC, ra/dec, RAJ2000/DEJ2000, ...) or given;
    numbers are degrees, strings may be sexagesimal (``10:00:28.6`` / ``10h00m28.6s``: RA in hours) or
    decimal degrees. ``id_col`` values must be unique and non-empty. ConfigError for anything wrong."""
    from galaxalign_batch.downstream.catalogs import RA_NAMES, DEC_NAMES, _angle_column, find_column, read_catalog
    from galaxalign_batch.downstream.common import CatalogError

    path = os.fspath(path)
    try:
        table = read_catalog(path, fmt)
        names = table.column_names
        ra_name = find_column(names, RA_NAMES, ra_col, "RA", path)
        dec_name = find_column(names, DEC_NAMES, dec_col, "Dec", path)
        ra = _angle_column(table, ra_name, path, hours_if_text=True)
        dec = _angle_column(table, dec_name, path, hours_if_text=False)
        id_name = find_column(names, (), id_col, "the target id", path) if id_col else None
    except CatalogError as e:
        raise ConfigError(f"--targets {e}") from None
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
    ra = np.where(bad, np.nan, np.mod(ra, 360.0))
    dec = np.where(bad, np.nan, dec)
    if bad.all():
        raise ConfigError(f"--targets {path}: columns {ra_name}/{dec_name} hold no valid position "
                          "(ICRS degrees or sexagesimal expected; Dec in [-90, 90])")
    if id_name is not None:
        ids = _column_values(table, id_name)
        if ids.dtype.kind == "f":
            if not np.isfinite(ids).all():
                raise ConfigError(f"--targets {path}: column {id_name} has empty ids")
            ids = np.array([str(int(v)) if float(v).is_integer() else repr(float(v)) for v in ids])
        ids = np.char.strip(ids.astype(str))
        if (ids == "").any():
            raise ConfigError(f"--targets {path}: column {id_name} has {int((ids == '').sum())} empty id(s) "
                              f"(first at row {int(np.argmax(ids == ''))})")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ConfigError(f"--targets {path}: column {id_name} repeats {int((counts > 1).sum())} id(s) "
                              f"(e.g. {uniq[counts > 1][0]!r}); target ids must be unique")
    else:
        ids = np.arange(len(ra)).astype(str)
    columns = {n: _column_values(table, n) for n in names
               if n not in (ra_name, dec_name, id_name) and table.column(n).type.num_fields == 0
               and not str(table.column(n).type).startswith(("fixed_size_list", "list"))}
    return Targets(path, file_sha256(path), ra.astype(np.float64), dec.astype(np.float64), ids, ra_name, dec_name,
                   id_name, columns)


# --- tile geometry --------------------------------------------------------------------------------

@dataclass
class Geometry:
    """Where a tile's image lies on the sky: WCS, (H, W), centre and radius (deg) of its footprint."""

    wcs: object
    shape: tuple[int, int]
    ra: float
    dec: float
    radius: float

    def pixels(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.wcs.all_world2pix(np.asarray(ra, np.float64), np.asarray(dec, np.float64), 0)
        return np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))

    def edge_distance(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Pixels from the position to the nearest image edge (negative: off the image; NaN far away)."""
        h, w = self.shape
        near = _separation(self.ra, self.dec, ra, dec) <= self.radius * 1.05
        out = np.full(len(ra), -np.inf)
        if near.any():
            x, y = self.pixels(ra[near], dec[near])
            d = np.minimum(np.minimum(x + 0.5, w - 0.5 - x), np.minimum(y + 0.5, h - 0.5 - y))
            out[near] = np.where(np.isfinite(d), d, -np.inf)
        return out


def _separation(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Great-circle distance in degrees (haversine)."""
    r0, d0, r, d = np.radians(ra0), np.radians(dec0), np.radians(ra), np.radians(dec)
    a = np.sin((d - d0) / 2) ** 2 + np.cos(d0) * np.cos(d) * np.sin((r - r0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))))


def image_file_of(ref) -> str:
    """The image file whose header describes tile ``ref`` (a cube, a loose brick file, a brick of a tree)."""
    from galaxalign_batch.survey import layout

    if not ref.is_brick:
        return ref.path
    for band in layout.BANDS:
        p = layout.image_path(ref.path, ref.brick, band)
        if p.exists():
            return os.fspath(p)
    hits = sorted(layout.coadd_dir(ref.path, ref.brick).glob(f"legacysurvey-{ref.brick}-image-*.fits*"))
    if not hits:
        raise TileError(layout.coadd_dir(ref.path, ref.brick), f"no image file of brick {ref.brick}")
    return os.fspath(hits[0])


def read_geometry(path: str | os.PathLike) -> Geometry:
    """The geometry of an image file from its header only (no pixel is read)."""
    from galaxalign_batch.survey.tile import celestial_wcs, image_hdu_index, open_fits, read_header

    with open_fits(path) as f:
        ext = image_hdu_index(path, f)
        info = f[ext].get_info()
        header = read_header(path, f, ext)
    dims = [int(d) for d in info["dims"]]
    h, w = dims[-2], dims[-1]
    wcs = celestial_wcs(path, header, (h, w))
    ra, dec = wcs.all_pix2world([(w - 1) / 2.0], [(h - 1) / 2.0], 0)
    cra, cdec = wcs.all_pix2world([-0.5, w - 0.5, -0.5, w - 0.5], [-0.5, -0.5, h - 0.5, h - 0.5], 0)
    radius = float(np.max(_separation(float(ra[0]), float(dec[0]), np.asarray(cra), np.asarray(cdec))))
    return Geometry(wcs, (h, w), float(ra[0]), float(dec[0]), radius)


def brick_of(ref) -> str | None:
    """The Legacy Survey brick name of a tile (a brick of a tree or a loose brick file), else None."""
    from galaxalign_batch.survey.bricks import parse_brick_filename

    if ref.is_brick:
        return ref.brick
    parsed = parse_brick_filename(ref.path)
    return parsed["brick"] if parsed else None


# --- assignment -----------------------------------------------------------------------------------

@dataclass
class Assignment:
    """Which targets each tile embeds (indices into the target list), and those no tile holds."""

    per_tile: dict[str, np.ndarray]  # tile key -> target indices (sorted)
    outside: np.ndarray  # target indices
    reasons: np.ndarray  # str, one per outside target

    @property
    def n_assigned(self) -> int:
        return int(sum(len(v) for v in self.per_tile.values()))


def assign_targets(targets: Targets, tiles, geometry=read_geometry) -> Assignment:
    """Assign every target to one tile of ``tiles`` (:class:`~galaxalign_batch.survey.tiles.TileRef`),
    by the rules of this module's docstring. Tiles whose header cannot be read are left out (the
    engine reports them when it reads them); their targets fall to other tiles or outside."""
    from galaxalign_batch.survey import layout

    n = len(targets)
    owner = np.full(n, -1, np.int64)
    valid = targets.valid
    tiles = list(tiles)
    geoms: dict[int, Geometry | None] = {}

    def geom(i: int) -> Geometry | None:
        if i not in geoms:
            try:
                geoms[i] = geometry(image_file_of(tiles[i]))
            except TileError as e:
                log.warning("cannot place targets on %s: %s", tiles[i].name, e)
                geoms[i] = None
        return geoms[i]

    by_brick: dict[str, list[int]] = {}
    for i, ref in enumerate(tiles):
        b = brick_of(ref)
        if b is not None:
            by_brick.setdefault(b, []).append(i)
    idx = np.flatnonzero(valid)
    if by_brick and len(idx):
        primary = layout.brick_name(targets.ra[idx], targets.dec[idx])
        for b in np.unique(primary):
            if str(b) not in by_brick:
                continue
            sel = idx[primary == b]
            for i in by_brick[str(b)]:  # the same brick under several roots: the first (sorted) holding it
                g = geom(i)
                if g is None:
                    continue
                todo = sel[owner[sel] < 0]
                inside = g.edge_distance(targets.ra[todo], targets.dec[todo]) > 0
                owner[todo[inside]] = i
    left = np.flatnonzero(valid & (owner < 0))
    if len(left):
        # candidates: the bricks of the run around each target's position (half a cell away in RA and Dec:
        # a brick image reaches 0.006 deg beyond its cell), and every tile that is not a brick (cubes)
        cand: dict[int, list[np.ndarray]] = {}
        if by_brick:
            ra, dec = targets.ra[left], targets.dec[left]
            step = 0.5 * layout.ROW_HEIGHT
            cosd = np.maximum(np.cos(np.radians(dec)), 0.01)
            for dra in (-step, 0.0, step):
                for ddec in (-step, 0.0, step):
                    names = layout.brick_name(np.mod(ra + dra / cosd, 360.0), np.clip(dec + ddec, -90.0, 90.0))
                    for b in np.unique(names):
                        for i in by_brick.get(str(b), ()):
                            cand.setdefault(i, []).append(np.flatnonzero(names == b))
        for i, ref in enumerate(tiles):
            if brick_of(ref) is None:
                cand[i] = [np.arange(len(left))]
        best = np.full(len(left), 0.0)
        for i in sorted(cand):
            g = geom(i)
            if g is None:
                continue
            k = np.unique(np.concatenate(cand[i]))
            d = g.edge_distance(targets.ra[left[k]], targets.dec[left[k]])
            better = d > best[k]
            owner[left[k[better]]] = i
            best[k[better]] = d[better]
    per_tile = {tiles[i].name: np.flatnonzero(owner == i) for i in np.unique(owner[owner >= 0]).tolist()}
    outside = np.flatnonzero(owner < 0)
    reasons = np.where(valid[outside], "outside every tile", "no valid position").astype(str)
    return Assignment(per_tile, outside, reasons)


def write_outside(path: str | os.PathLike, targets: Targets, assignment: Assignment) -> str:
    """Write the targets no tile holds as CSV (row, target_id, ra, dec, reason), atomically; returns the path."""
    path = os.fspath(path)
    with atomic.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "target_id", "ra", "dec", "reason"])
        for i, why in zip(assignment.outside.tolist(), assignment.reasons.tolist()):
            w.writerow([i, targets.ids[i], "" if not np.isfinite(targets.ra[i]) else repr(float(targets.ra[i])),
                        "" if not np.isfinite(targets.dec[i]) else repr(float(targets.dec[i])), why])
    return path
