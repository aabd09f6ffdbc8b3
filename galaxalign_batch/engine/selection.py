"""What a run embeds: every source, a target list or a ``--where`` cut; the catalogue columns it keeps.

The selection is part of a store's identity: its ``selection`` attribute records the targets file (path,
SHA-256, columns) or the canonical cut, and a resumed run must select the same (otherwise its tiles,
recorded as done, would hold other sources than the run asks for). A run over every source on a store
made from a selection is refused for the same reason, instead of skipping its tiles.

Section reads (:mod:`galaxalign_batch.survey.sections`) are used for bricks when the selected sources'
cutouts need at most :data:`SPARSE_FRACTION` of the brick's pixels (``sections="auto"``), always
(``"always"``) or never (``"never"``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from galaxalign_batch.errors import ConfigError, TileError
from galaxalign_batch.store.schema import Column

log = logging.getLogger(__name__)

#: --keep-columns default for Tractor input (the columns a join most often wants)
TRACTOR_KEEP = ("type", "flux_g", "flux_r", "flux_z", "flux_ivar_g", "flux_ivar_r", "flux_ivar_z", "shape_r",
                "shape_e1", "shape_e2", "sersic")
#: columns of detected sources (galaxalign_batch.survey.sources.detect_sources) that can be kept
DETECTION_KEEP = {"flux": "float64", "a": "float64", "b": "float64", "theta": "float64", "npix": "int64",
                  "peak": "float64", "flags": "int64"}
#: section reads when the cutouts need at most this share of a brick's pixels
SPARSE_FRACTION = 0.5
SECTIONS = ("auto", "always", "never")
ALL = {"kind": "all"}


@dataclass(frozen=True)
class TileSelection:
    """What one tile task embeds (shipped to the task)."""

    targets: dict | None = None  # ra, dec, ids (str), columns {name: values}
    where: str | None = None
    keep: tuple[tuple[str, str], ...] = ()  # (name, dtype) of the optional store columns, in order
    sections: str = "auto"


@dataclass
class Selection:
    """A run's selection (made before Ray starts by :func:`make_selection`)."""

    identity: dict = field(default_factory=lambda: dict(ALL))
    keep: tuple[Column, ...] = ()
    keep_explicit: bool = False
    where: object | None = None  # survey.where.Where
    targets: object | None = None  # survey.targets.Targets
    assignment: object | None = None  # survey.targets.Assignment
    sections: str = "auto"
    outside_file: str | None = None

    @property
    def kind(self) -> str:
        return self.identity["kind"]

    def restrict(self, tiles: list) -> list:
        """The tiles this selection needs (with targets: only those holding some)."""
        if self.assignment is None:
            return list(tiles)
        return [t for t in tiles if t.name in self.assignment.per_tile]

    def for_tile(self, name: str) -> TileSelection | None:
        keep = tuple((c.name, c.dtype) for c in self.keep)
        if self.kind == "all" and not keep:
            return None  # the plain path
        targets = None
        if self.assignment is not None:
            idx = self.assignment.per_tile.get(name, np.zeros(0, np.int64))
            t = self.targets
            targets = {"ra": t.ra[idx], "dec": t.dec[idx], "ids": t.ids[idx],
                       "columns": {c.name: t.columns[c.name][idx] for c in self.keep if c.name in t.columns}}
        return TileSelection(targets, self.where.text if self.where is not None else None, keep, self.sections)

    def attrs(self) -> dict:
        return {"selection": self.identity}

    def lines(self) -> list[str]:
        if self.kind == "where":
            return [f"selection: --where {self.identity['where']}"]
        if self.kind != "targets":
            return []
        a = self.assignment
        out = [f"targets: {len(self.targets)} in {self.targets.path}: {a.n_assigned} on "
               f"{len(a.per_tile)} tile(s), {len(a.outside)} outside every tile"]
        if len(a.outside):
            out.append(f"targets outside every tile (or without a position) listed in {self.outside_file}")
        return out


def _catalog_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Store dtypes of a Tractor catalog's per-row scalar columns (lower-case names), from one row."""
    from galaxalign_batch.survey.tile import open_fits

    with open_fits(path) as f:
        ext = next((i for i, hdu in enumerate(f) if hdu.get_info()["hdutype"] in (1, 2)), None)
        if ext is None:
            raise ConfigError(f"{path}: no table HDU (not a Tractor catalog)")
        if f[ext].get_nrows() == 0:
            return {}
        row = f[ext].read(rows=[0], lower=True)
    out = {}
    for name in row.dtype.names:
        dt = row.dtype[name]
        if dt.shape:
            continue  # array-valued (apflux_*, ...): not one value per row
        out[name] = _store_dtype(dt)
    return out


def _store_dtype(dt: np.dtype) -> str:
    if dt.kind in "SUO":
        return "str"
    if dt.kind == "b":
        return "bool"
    return np.dtype(dt).newbyteorder("=").name


def sample_catalog(tiles: list, catalog: str) -> str | None:
    """A Tractor catalog the run reads (``--sources PATH``, or the first tile's under ``auto``), else None."""
    if catalog == "detect":
        return None
    if catalog != "auto":
        return catalog
    for ref in tiles:
        p = tractor_of(ref)
        if p is not None:
            return p
    return None


def tractor_of(ref) -> str | None:
    """The Tractor catalog ``--sources auto`` uses for tile ``ref`` (a brick of a tree with its file), else None."""
    from galaxalign_batch.survey import layout
    from galaxalign_batch.survey.bricks import parse_brick_filename

    if getattr(ref, "is_brick", False) and ref.brick:
        p = layout.tractor_path(ref.path, ref.brick)
        return os.fspath(p) if p.exists() else None
    parsed = parse_brick_filename(getattr(ref, "path", ""))
    if parsed is None:
        return None
    img = Path(ref.path)
    if len(img.parents) < 4:
        return None
    root = img.parents[3]
    if layout.image_path(root, parsed["brick"], parsed["band"] or "g") != img:
        return None
    p = layout.tractor_path(root, parsed["brick"])
    return os.fspath(p) if p.exists() else None


def _parse_keep(keep_columns) -> list[str] | None:
    if keep_columns is None:
        return None
    if isinstance(keep_columns, str):
        keep_columns = [keep_columns]
    names = [n.strip() for item in keep_columns for n in str(item).split(",") if n.strip()]
    if names in (["none"], ["NONE"]):
        return []
    return list(dict.fromkeys(names))


def make_selection(tiles: list, out: str | os.PathLike, *, catalog: str = "auto", targets: str | None = None,
                   ra_col: str | None = None, dec_col: str | None = None, id_col: str | None = None,
                   where: str | None = None, keep_columns=None, sections: str = "auto") -> Selection:
    """Check and resolve the selection options before Ray starts (ConfigError for anything wrong).

    With ``targets`` the list is read, hashed and assigned to ``tiles`` (headers only); the targets no tile
    holds are written to ``OUT.targets-outside.csv``. ``keep_columns``: names (or one comma-separated
    string), ``"none"``, or None for the default (``TRACTOR_KEEP`` for Tractor input, none otherwise).
    """
    from galaxalign_batch.survey.targets import assign_targets, read_targets, write_outside
    from galaxalign_batch.survey.where import parse_where

    if sections not in SECTIONS:
        raise ConfigError(f"--section-reads must be one of {', '.join(SECTIONS)}, not {sections!r}")
    if any(not hasattr(t, "is_brick") for t in tiles) and (targets or where):
        raise ConfigError("--targets / --where select sources of survey tiles (bricks, cutout cubes), not of "
                          "picture sets")
    names = _parse_keep(keep_columns)
    sel = Selection(sections=sections, keep_explicit=names is not None)
    if targets is not None:
        if where is not None:
            raise ConfigError("--targets and --where cannot be combined (a target list has no catalogue "
                              "columns to cut on; cut the list itself)")
        t = read_targets(targets, ra_col, dec_col, id_col)
        missing = [n for n in names or [] if n not in t.columns]
        if missing:
            raise ConfigError(f"--keep-columns: {', '.join(missing)} not in {targets} (columns: "
                              f"{', '.join(list(t.columns)[:20])})")
        keep = [Column("target_id", "str", f"the target's {'id (' + t.id_col + ')' if t.id_col else 'row number'} "
                                         f"in {os.path.basename(t.path)}")]
        for n in names or []:
            keep.append(Column(n, _store_dtype(np.asarray(t.columns[n]).dtype), f"column {n} of the targets file"))
        sel.targets, sel.identity = t, t.identity()
        sel.keep = tuple(keep)
        sel.assignment = assign_targets(t, tiles)
        if len(sel.assignment.outside):
            os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out))), exist_ok=True)
            sel.outside_file = write_outside(f"{os.fspath(out)}.targets-outside.csv", t, sel.assignment)
            log.warning("%d of %d targets lie outside every tile (or have no position): listed in %s",
                        len(sel.assignment.outside), len(t), sel.outside_file)
        if not sel.assignment.per_tile:
            raise ConfigError(f"--targets {targets}: none of its {len(t)} targets lies on a tile of this run "
                              f"(listed in {sel.outside_file})")
        return sel
    if where is not None:
        sel.where = parse_where(where)
        sel.identity = {"kind": "where", "where": sel.where.text}
    sample = sample_catalog(tiles, catalog)
    dtypes = _catalog_dtypes(sample) if sample else {}
    if sel.where is not None and sample is not None:
        have = set(dtypes) | {f"mag_{c[5:]}" for c in dtypes if c.startswith("flux_")}
        unknown = [c for c in sel.where.columns if c not in have]
        if unknown:
            raise ConfigError(f"--where {sel.where.text!r}: no column {', '.join(unknown)} in the Tractor catalog "
                              f"{sample} (mag_X comes from flux_X)")
    pictures = any(not hasattr(t, "is_brick") for t in tiles)
    if pictures and names:
        raise ConfigError("--keep-columns: picture sets have no catalogue columns; embed them in another store")
    if names is None:  # the default: the usual Tractor columns when the input has Tractor catalogs
        names = [n for n in TRACTOR_KEEP if n in dtypes] if not pictures else []
    keep = []
    for n in names:
        n = n.lower()
        if n in dtypes:
            keep.append(Column(n, dtypes[n], f"Tractor column {n}"))
        elif n in DETECTION_KEEP or n.startswith("flux_"):
            keep.append(Column(n, DETECTION_KEEP.get(n, "float64"), f"catalogue column {n}"))
        elif sample is not None:
            raise ConfigError(f"--keep-columns: no per-row column {n!r} in the Tractor catalog {sample}")
        else:
            raise ConfigError(f"--keep-columns {n}: this run has no Tractor catalog; detected sources have "
                              f"{', '.join(sorted(DETECTION_KEEP))} and flux_<band>")
    sel.keep = tuple(keep)
    return sel


def check_resume(store, selection: Selection | None) -> None:
    """Refuse to resume ``store`` with another selection (or kept columns given differently); without
    explicit ``--keep-columns`` the store's kept columns are used."""
    have = store.attrs.get("selection") or ALL
    want = selection.identity if selection is not None else ALL
    if have != want:
        raise ConfigError(f"{store.path}: made from {_describe(have)}; this run selects {_describe(want)}. "
                          + ("Its tiles are recorded as done with only the selected sources, so a full run would "
                             "skip them: use another --out for the full run"
                             if want == ALL else
                             "Resuming with another selection would mix them: give the same selection, or "
                             "another --out"))
    if selection is None:
        return
    stored = tuple(getattr(store, "extra_columns", ()))
    if selection.keep_explicit and tuple((c.name, c.dtype) for c in stored) != \
            tuple((c.name, c.dtype) for c in selection.keep):
        raise ConfigError(f"{store.path}: keeps the columns {', '.join(c.name for c in stored) or '(none)'}, "
                          f"this run asks for {', '.join(c.name for c in selection.keep) or '(none)'}; the "
                          "columns are fixed when a store is made: give the same --keep-columns, or another --out")
    selection.keep = stored


def _describe(identity: dict) -> str:
    kind = identity.get("kind")
    if kind == "targets":
        return (f"the targets file {identity.get('file')} (sha256 {str(identity.get('sha256'))[:12]}..., "
                f"{identity.get('rows')} rows)")
    if kind == "where":
        return f"the cut --where {identity.get('where')!r}"
    return "every source of its tiles (no --targets or --where)"


# --- in the tile task --------------------------------------------------------------------------------

def _brick_files(ref):
    """(image paths, invvar paths or None) of a brick tile, as the whole-brick read would use them."""
    from galaxalign_batch.engine import prepare
    from galaxalign_batch.survey import layout
    from galaxalign_batch.survey.bricks import brick_siblings

    bands = tuple(getattr(prepare, "_RUN_BANDS", None) or layout.BANDS)  # embed --bands, as the whole read
    if ref.is_brick:
        return ({b: layout.image_path(ref.path, ref.brick, b) for b in bands},
                {b: layout.image_path(ref.path, ref.brick, b, "invvar") for b in bands})
    _, images, invvars, _ = brick_siblings(ref.path)
    for b in bands:
        if b not in images:
            raise TileError(Path(ref.path).parent / f"legacysurvey-{ref.name}-image-{b}.fits.fz",
                            f"missing band {b} of brick {os.path.basename(ref.name)}")
    images = {b: images[b] for b in bands}
    invvars = {b: invvars[b] for b in bands}
    if not all(p.exists() for p in invvars.values()):
        invvars = None
    return images, invvars


def is_brick_tile(ref) -> bool:
    from galaxalign_batch.survey.bricks import parse_brick_filename

    return bool(getattr(ref, "is_brick", False)) or parse_brick_filename(ref.path) is not None


def _column_values(values, n: int, dtype: str) -> np.ndarray:
    from galaxalign_batch.store.schema import fill_value

    if values is None:
        return np.full(n, fill_value(dtype), dtype=object if dtype == "str" else dtype).astype(
            str if dtype == "str" else dtype)
    v = np.asarray(values)
    if dtype == "str":
        if v.dtype.kind == "S":
            v = np.char.decode(v, "ascii", "replace")
        return np.char.strip(v.astype(str))
    return v.astype(dtype)


def prepare_selected(ref, spec, catalog: str, sel: TileSelection):
    """:func:`~galaxalign_batch.engine.prepare.prepare_tile` for a selection: targets at their positions,
    or the catalogue's sources that pass ``--where``; section reads where they pay (see the module)."""
    from galaxalign_batch.engine.prepare import cut_sources, read_tile
    from galaxalign_batch.survey import sources_for
    from galaxalign_batch.survey.sections import brick_frame, fraction_needed, read_brick_sections
    from galaxalign_batch.survey.sources import read_tractor
    from galaxalign_batch.survey.targets import ID_PREFIX
    from galaxalign_batch.survey.where import parse_where

    t0 = time.perf_counter()
    brick = is_brick_tile(ref) and sel.sections != "never"
    tile = frame = None
    if sel.targets is not None:
        tg = sel.targets
        ra, dec = np.asarray(tg["ra"], np.float64), np.asarray(tg["dec"], np.float64)
        if brick:
            frame = brick_frame(*_brick_files(ref), name=os.path.basename(ref.name))
            x, y = (np.atleast_1d(np.asarray(v, np.float64)) for v in frame.wcs.all_world2pix(ra, dec, 0))
            if sel.sections == "always" or fraction_needed(frame, x, y, spec) <= SPARSE_FRACTION:
                tile = read_brick_sections(frame, x, y, spec)
        if tile is None:
            tile = read_tile(ref)
            x, y = (np.atleast_1d(np.asarray(v, np.float64)) for v in tile.world_to_pixel(ra, dec))
        ids = np.asarray(tg["ids"]).astype(str)
        sources = {"object_id": np.char.add(ID_PREFIX, ids), "ra": ra, "dec": dec, "x": x, "y": y,
                   "target_id": ids, **tg["columns"]}
        t1 = time.perf_counter()
    else:
        where = parse_where(sel.where) if sel.where else None
        need = tuple(dict.fromkeys((where.needed_columns() if where else ()) + tuple(n for n, _ in sel.keep)))
        cat = tractor_of(ref) if catalog == "auto" else (None if catalog == "detect" else catalog)
        sources = None
        if brick and cat is not None and where is not None:
            frame = brick_frame(*_brick_files(ref), name=os.path.basename(ref.name))
            empty = read_brick_sections(frame, np.zeros(0), np.zeros(0), spec)  # geometry only, no pixel read
            sources = _cut(read_tractor(cat, empty, keep=need), where, ref)
            x, y = np.asarray(sources["x"], np.float64), np.asarray(sources["y"], np.float64)
            if sel.sections == "always" or fraction_needed(frame, x, y, spec) <= SPARSE_FRACTION:
                tile = read_brick_sections(frame, x, y, spec)
        if tile is None:
            tile = read_tile(ref)
        if sources is None:
            sources = _cut(sources_for(tile, catalog=catalog, id_prefix=ref.name, columns=need), where, ref)
        t1 = time.perf_counter()
    n = len(sources["ra"])
    extra = {}
    for name, dtype in sel.keep:
        extra[name] = _column_values(sources[name] if name in _names(sources) else None, n, dtype)
    return cut_sources(ref, tile, sources, spec, t0, t1, extra)


def _names(sources) -> list[str]:
    return list(sources.keys()) if isinstance(sources, dict) else list(sources.colnames)


def _cut(sources, where, ref):
    if where is None:
        return sources
    try:
        mask = where.evaluate(sources, len(sources))
    except ConfigError as e:
        raise TileError(ref.path, str(e)) from None
    return sources[mask]
