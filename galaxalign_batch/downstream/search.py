"""`search`: the stored galaxies most similar to a query (a stored object, a sky position, or an image).

Similarity is the inner product of L2-normalised embeddings (cosine). Exact search streams the
store's ``embedding`` array through the fused top-k kernel (:func:`galaxalign_batch.ops.similarity_topk`,
ties by lower row); an approximate faiss index (``galaxalign_batch.downstream.index``) serves
stores above ~10^7 rows. A query that is a stored row finds itself first (score ~1).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from galaxalign_batch import progress
from galaxalign_batch.downstream.common import QueryError, classification_of
from galaxalign_batch.downstream.index import APPROX_THRESHOLD, KINDS, get_index
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.sky import arcsec_from_chord, radec_to_xyz
from galaxalign_batch.store import EmbeddingStore, schema

log = logging.getLogger(__name__)

INDEX_CHOICES = ("auto", "exact") + KINDS
FITS_SUFFIXES = (".fits", ".fits.fz", ".fit", ".fts", ".fits.gz")


@dataclass
class Query:
    kind: str  # object | near | image
    text: str  # how the user gave it
    vector: np.ndarray  # (D,) float32
    row: int | None = None  # the stored row, when the query is one
    pixels: np.ndarray | None = None  # the query picture (3, S, S) when it came from a file
    note: str = ""


@dataclass
class SearchResult:
    query: Query
    rows: np.ndarray
    scores: np.ndarray
    table: "object"  # pandas.DataFrame
    method: str
    extra: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        head = [f"query: {self.query.kind} {self.query.text}" + (f" ({self.query.note})" if self.query.note else ""),
                f"search: {self.method}"]
        return head + self.table.to_string(index=False, float_format=lambda v: f"{v:.6f}").splitlines()


# ---------------------------------------------------------------------------------------------- queries

def find_object_rows(store: EmbeddingStore, object_ids: Sequence[str]) -> dict[str, int]:
    """Rows of the given object ids (those not in the store are absent from the result).

    The tile named inside an id (``release/BRICK/objid``, ``TILE/detN``) is searched first; the
    whole ``object_id`` column is scanned only for ids not found there.
    """
    wanted = [str(o) for o in object_ids]
    found: dict[str, int] = {}
    tiles = store.tile_table()
    by_tile = {str(n): (int(s), int(c)) for n, s, c, st in zip(tiles["name"], tiles["row_start"], tiles["row_count"],
                                                                  tiles["status"]) if st == schema.STATUS_DONE}
    by_brick: dict[str, list[tuple[int, int]]] = {}  # tile keys are brick folders: BRICK -> their spans
    for name, span in by_tile.items():
        by_brick.setdefault(os.path.basename(name), []).append(span)
    for oid in wanted:
        spans = [sp for guess in _tile_guesses(oid)
                 for sp in ([by_tile[guess]] if guess in by_tile else by_brick.get(guess, []))]
        for s, c in spans:
            hit = np.flatnonzero(np.asarray(store.read("object_id", slice(s, s + c))) == oid)
            if len(hit):
                found[oid] = s + int(hit[0])
                break
    rest = {o for o in wanted if o not in found}
    if rest:
        _, shard = store.chunking
        n = store.n_rows
        for start in progress.bar(range(0, n, shard), total=-(-n // shard), desc="looking up ids", unit="chunk"):
            ids = np.asarray(store.read("object_id", slice(start, min(start + shard, n))))
            for i in np.flatnonzero(np.isin(ids, list(rest))):
                found.setdefault(str(ids[i]), start + int(i))
            rest -= set(found)
            if not rest:
                break
    return found


def _tile_guesses(oid: str) -> list[str]:
    guesses = []
    if "/det" in oid:
        guesses.append(oid.rsplit("/det", 1)[0])
    parts = oid.split("/")
    if len(parts) == 3:
        guesses.append(parts[1])
    return guesses


def query_object(store: EmbeddingStore, object_id: str) -> Query:
    rows = find_object_rows(store, [object_id])
    if object_id not in rows:
        raise QueryError(f"{store.path}: unknown object id {object_id!r} (not in the store's object_id column)")
    row = rows[object_id]
    return Query("object", object_id, _stored_vector(store, row), row)


def parse_position(text: str) -> tuple[float, float]:
    """``"RA,DEC"`` in degrees -> (ra, dec); a clear error for anything else."""
    parts = str(text).replace(" ", "").split(",")
    try:
        ra, dec = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--near {text!r}: expected RA,DEC in degrees, e.g. --near 150.12,2.205") from None
    if not (np.isfinite(ra) and np.isfinite(dec)) or not -90.0 <= dec <= 90.0:
        raise ConfigError(f"--near {text!r}: Dec must be in [-90, 90] degrees and both numbers finite")
    return ra % 360.0, dec


def nearest_rows(store: EmbeddingStore, ra: float, dec: float, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, separations in arcsec) of the stored sources within ``radius_arcsec`` of (ra, dec), nearest first.

    Scans only the ``healpix`` column for the pixels (at an order a little coarser than the radius)
    that the search cone touches, then measures the exact separations of the candidates.
    """
    import astropy.units as u
    from astropy_healpix import HEALPix

    order = _order_for(radius_arcsec)
    pix = HEALPix(nside=2 ** order, order="nested").cone_search_lonlat(ra * u.deg, dec * u.deg, radius_arcsec * u.arcsec)
    pix = np.unique(np.asarray(pix, dtype=np.int64))
    shift = 2 * (schema.HEALPIX_ORDER - order)
    _, shard = store.chunking
    n = store.n_rows
    cand: list[np.ndarray] = []
    for start in progress.bar(range(0, n, shard), total=-(-n // shard), desc="cone search", unit="chunk"):
        hp = np.asarray(store.read("healpix", slice(start, min(start + shard, n)))) >> shift
        hit = np.flatnonzero(np.isin(hp, pix))
        if len(hit):
            cand.append(start + hit)
    rows = np.concatenate(cand) if cand else np.zeros(0, np.int64)
    if not len(rows):
        return rows, np.zeros(0)
    xyz = radec_to_xyz(store.read("ra", rows), store.read("dec", rows))
    sep = arcsec_from_chord(np.linalg.norm(xyz - radec_to_xyz(ra, dec), axis=-1))
    keep = sep <= radius_arcsec
    rows, sep = rows[keep], sep[keep]
    order_ = np.lexsort((rows, sep))
    return rows[order_], sep[order_]


def _order_for(radius_arcsec: float, max_order: int = 20) -> int:
    """The finest HEALPix order whose pixels are at least as large as the radius (few pixels per cone)."""
    from astropy_healpix import nside_to_pixel_resolution

    import astropy.units as u

    order = 0
    while order < max_order and nside_to_pixel_resolution(2 ** (order + 1)).to_value(u.arcsec) >= radius_arcsec:
        order += 1
    return order


def query_near(store: EmbeddingStore, text: str, radius_arcsec: float = 5.0) -> Query:
    ra, dec = parse_position(text)
    rows, sep = nearest_rows(store, ra, dec, radius_arcsec)
    if not len(rows):
        raise QueryError(f"{store.path}: no source of the store within {radius_arcsec:g} arcsec of RA, Dec = "
                         f"{ra:.6f}, {dec:.6f} (outside the store's footprint? widen --radius)")
    row = int(rows[0])
    oid = str(store.read("object_id", np.array([row]))[0])
    return Query("near", f"{ra:.6f},{dec:.6f}", _stored_vector(store, row), row,
                 note=f"nearest source {oid} at {sep[0]:.2f} arcsec")


def _stored_vector(store: EmbeddingStore, row: int) -> np.ndarray:
    return np.asarray(store.read_embeddings(np.array([row]))[0], dtype=np.float32)


def read_query_image(path: str | os.PathLike, spec) -> np.ndarray:
    """A query image as a cutout ``(3, S, S)`` float32 in [0, 1], in the store's pixel convention.

    FITS files (a cutout cube, or a Legacy Survey coadd file) go through the store's preprocessing
    with a cutout at the image centre. Pictures (PNG, JPEG, ...) are taken as already-stretched RGB
    shown north up: they are resized to the cutout size, and flipped vertically for a store whose
    cutouts keep the tile's pixel rows (``spec.orientation == "fits"``: row 0 south for the Legacy Survey).
    """
    from galaxalign_batch.preprocess import make_cutouts

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QueryError(f"{path}: image file not found")
    if path.lower().endswith(FITS_SUFFIXES):
        from galaxalign_batch.survey import open_tile

        tile = open_tile(path)
        h, w = tile.shape
        batch = make_cutouts(tile.image, tile.valid, np.array([(w - 1) / 2.0]), np.array([(h - 1) / 2.0]),
                             tile.pixscale, spec, bands=tile.bands, wcs=tile.wcs)
        p = batch.pixels[0]
        return p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p.astype(np.float32)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise QueryError(f"{path}: not an image ({' '.join(str(e).split())})") from None
    import torch

    rows = rgb[::-1] if spec.orientation == "fits" else rgb
    x = torch.from_numpy(np.ascontiguousarray(rows)).permute(2, 0, 1)[None].float() / 255.0
    s = spec.out_size
    if x.shape[-2:] != (s, s):
        from galaxalign_batch.model.inputs import resize_images

        x = resize_images(x, s).clamp(0, 1)
    return x[0].numpy()


def query_image(store: EmbeddingStore, path: str, model: str | None, device: str = "cpu") -> Query:
    from galaxalign_batch.downstream.classify import check_model
    from galaxalign_batch.engine.encoder import load_encoder

    if not model:
        m = store.attrs.get("model") or {}
        raise ConfigError(f"--image needs --model: the model the store was embedded with ({m.get('kind')} "
                          f"{m.get('name')}, id {m.get('id')}) encodes the image")
    pixels = read_query_image(path, store.cutout_spec)
    encoder = load_encoder(model, device=device)
    check_model(store, encoder.identity)
    vec = encoder.encode(pixels[None])[0]
    return Query("image", os.fspath(path), vec.astype(np.float32), pixels=pixels)


# ---------------------------------------------------------------------------------------------- the search

def search_store(store: EmbeddingStore, query: Query, k: int = 10, *, index: str = "auto",
                 rebuild_index: bool = False, target_recall: float = 0.95) -> SearchResult:
    """The ``k`` stored rows most similar to ``query`` with a table of their ids, positions, scores, labels."""
    import pandas as pd
    import torch

    from galaxalign_batch import ops

    n = store.n_rows
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"-k must be a positive integer, got {k!r}")
    if k > n:
        raise ConfigError(f"-k {k} is larger than the store ({n} rows)")
    if index not in INDEX_CHOICES:
        raise ConfigError(f"--index must be one of {', '.join(INDEX_CHOICES)}, got {index!r}")
    if query.vector.shape != (store.dim,):
        raise QueryError(f"query vector has shape {query.vector.shape}, the store's embeddings are ({store.dim},)")
    kind = index
    if kind == "auto":
        kind = "ivf" if n >= APPROX_THRESHOLD else "exact"
    q = query.vector[None].astype(np.float32)
    extra: dict = {}
    if kind == "exact":
        _, shard = store.chunking
        scores, rows = ops.similarity_topk(torch.from_numpy(q), store.embeddings, k, chunk_rows=shard)
        scores, rows = scores.numpy()[0], rows.numpy()[0]
        method = f"exact ({n} rows, fused top-k)"
    else:
        idx = get_index(store, kind, rebuild=rebuild_index, target_recall=target_recall)
        scores, rows = idx.search(q, k)
        scores, rows = scores[0], rows[0]
        keep = rows >= 0
        scores, rows = scores[keep], rows[keep]
        method = idx.describe()
        extra["index"] = idx.meta
    table = pd.DataFrame({"rank": np.arange(len(rows)), "object_id": store.read("object_id", rows),
                          "ra": store.read("ra", rows), "dec": store.read("dec", rows),
                          "score": scores.astype(np.float64)})
    cls = classification_of(store)
    if cls is not None:
        table["label"] = cls.key_of(store.read("label", rows))
        table["confidence"] = store.read("confidence", rows).astype(np.float64)
    return SearchResult(query, np.asarray(rows, np.int64), np.asarray(scores, np.float32), table, method, extra)


# ---------------------------------------------------------------------------------------------- picture grid

def plot_grid(store: EmbeddingStore, result: SearchResult, path: str | os.PathLike, *,
              roots: Sequence[str] | None = None, columns: int = 6) -> str:
    """A PNG of the query and its neighbours, cutouts re-made from the tiles (north up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from galaxalign_batch.preprocess.pictures import to_rgb8

    wanted = list(result.rows)
    if result.query.row is not None:
        wanted.append(result.query.row)
    cut = store.cutouts(wanted, roots=roots)
    panels: list[tuple[str, np.ndarray | None]] = []
    if result.query.pixels is not None:
        qpix = result.query.pixels
    else:
        qpix = cut.get(result.query.row)
    qtext = os.path.basename(result.query.text) if result.query.kind == "image" else result.query.text
    panels.append((f"query\n{_short(qtext)}", qpix))
    t = result.table
    for i, row in enumerate(result.rows):
        title = f"#{i}  {t['score'].iloc[i]:.3f}"
        if "label" in t:
            title += f"\n{t['label'].iloc[i]}"
        panels.append((title, cut.get(int(row))))
    ncol = min(columns, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.4 * nrow), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, pix) in zip(axes.flat, panels):
        if pix is None:
            ax.text(0.5, 0.5, "tile not found", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(to_rgb8(pix, store.cutout_spec.orientation), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    path = os.fspath(path)
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    missing = sum(p is None for _, p in panels)
    if missing:
        log.warning("%d of %d pictures could not be re-made (tiles not found: pass --survey ROOT)", missing, len(panels))
    return path


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


def run_query(store: EmbeddingStore, *, object_id: str | None = None, near: str | None = None,
              image: str | None = None, model: str | None = None, radius_arcsec: float = 5.0,
              device: str = "cpu") -> Query:
    """The :class:`Query` of exactly one of ``object_id``, ``near``, ``image``."""
    given = [x for x in (object_id, near, image) if x is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one query: --object ID, --near RA,DEC or --image FILE")
    if object_id is not None:
        return query_object(store, object_id)
    if near is not None:
        return query_near(store, near, radius_arcsec)
    return query_image(store, image, model, device)
