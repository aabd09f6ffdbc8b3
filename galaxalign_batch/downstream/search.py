"""`search`: the stored galaxies most similar to a query, in the three modalities of the model.

A query is a stored object, a sky position, an image (through the image tower), a text (through the
text tower) or a drawn symbol (through the symbol encoder); the towers are those of the store's
model (:mod:`galaxalign_batch.downstream.towers`). Similarity is the inner product of L2-normalised
embeddings (cosine). Exact search streams the store's ``embedding`` array through the fused top-k
kernel (:func:`galaxalign_batch.ops.similarity_topk`, ties by lower row), every query of a batch in
the same pass; an approximate faiss index (``galaxalign_batch.downstream.index``) serves stores
above ~10^7 rows. A query that is a stored row finds itself first (score ~1). Optionally, results
closer on the sky than ``dedup`` arcsec to a better-scoring result are one object (kept once).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from galaxalign_batch import atomic, progress
from galaxalign_batch.downstream.common import QueryError, classification_of
from galaxalign_batch.downstream.index import APPROX_THRESHOLD, KINDS, get_index
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.sky import arcsec_from_chord, chord_from_arcsec, radec_to_xyz, viewer_url
from galaxalign_batch.store import EmbeddingStore, schema

log = logging.getLogger(__name__)

INDEX_CHOICES = ("auto", "exact") + KINDS
FITS_SUFFIXES = (".fits", ".fits.fz", ".fit", ".fts", ".fits.gz")
QUERY_KINDS = ("object", "near", "image", "text", "symbol")


@dataclass
class Query:
    kind: str  # object | near | image | text | symbol
    text: str  # how the user gave it
    vector: np.ndarray  # (D,) float32
    row: int | None = None  # the stored row, when the query is one
    pixels: np.ndarray | None = None  # the query picture (3, S, S): an image in the store's convention, or a symbol
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
        """The query, the method and the table (without the viewer links, which the CSV has)."""
        head = [f"query: {self.query.kind} {self.query.text}" + (f" ({self.query.note})" if self.query.note else ""),
                f"search: {self.method}"]
        shown = self.table.drop(columns=[c for c in ("viewer",) if c in self.table])
        return head + shown.to_string(index=False, float_format=lambda v: f"{v:.6f}").splitlines()


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
        hint = "outside the store's footprint?"
        for wider in (60.0, 600.0):  # say how far the nearest source is, so the user can widen --radius to it
            if wider > radius_arcsec:
                near, far = nearest_rows(store, ra, dec, wider)
                if len(near):
                    oid = str(store.read("object_id", near[:1])[0])
                    hint = (f"the nearest is {oid} at {far[0]:.1f} arcsec: --radius {math.ceil(far[0])}arcsec "
                            f"takes it")
                    break
        else:
            hint = f"none within {600 / 60:g} arcmin: outside the store's footprint"
        raise QueryError(f"{store.path}: no source of the store within {radius_arcsec:g} arcsec of RA, Dec = "
                         f"{ra:.6f}, {dec:.6f} ({hint})")
    row = int(rows[0])
    oid = str(store.read("object_id", np.array([row]))[0])
    return Query("near", f"{ra:.6f},{dec:.6f}", _stored_vector(store, row), row,
                 note=f"nearest source {oid} at {sep[0]:.2f} arcsec")


def _stored_vector(store: EmbeddingStore, row: int) -> np.ndarray:
    return np.asarray(store.read_embeddings(np.array([row]))[0], dtype=np.float32)


def read_query_image(path: str | os.PathLike, spec, image_scale: dict | None = None) -> np.ndarray:
    """A query image as a cutout ``(3, S, S)`` float32 in [0, 1], in the store's pixel convention.

    FITS files (a cutout cube, or a Legacy Survey coadd file) go through the store's preprocessing
    with a cutout at the image centre. Pictures (PNG, JPEG, ...) are taken as already-stretched RGB
    shown north up and go through ``embed``'s picture path (:func:`galaxalign_batch.preprocess.rgb.rgb_cutouts`):
    cut to the store's field around their centre at ``image_scale``'s ``pixscale`` / ``angular_size`` (the
    record of ``--pixscale`` / ``--angular-size``), or, without one, taken to show the store's field (the
    longer side resized to it); a stored picture given back scores 1.0 against itself.
    """
    from galaxalign_batch.preprocess import make_cutouts

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QueryError(f"{path}: image file not found")
    if path.lower().endswith(FITS_SUFFIXES):
        from galaxalign_batch.survey import open_tile

        tile = open_tile(path)
        h, w = tile.shape
        p = make_cutouts(tile.image, tile.valid, np.array([(w - 1) / 2.0]), np.array([(h - 1) / 2.0]),
                         tile.pixscale, spec, bands=tile.bands, wcs=tile.wcs).pixels[0]
    else:
        from galaxalign_batch.errors import TileError
        from galaxalign_batch.preprocess.rgb import picture_pixscale, rgb_cutouts
        from galaxalign_batch.survey.images import read_picture

        try:
            pic = read_picture(path)
        except TileError as e:
            raise QueryError(f"{path}: not an image ({e.reason})") from None
        scale = image_scale or {}
        pixscale = picture_pixscale(pic.shape[:2], pixscale=scale.get("pixscale"),
                                    angular_size=scale.get("angular_size"), spec=spec)
        pixels, masked = rgb_cutouts([pic], [pixscale], spec)
        if masked[0] > 0:
            log.info("%s: %.0f%% of the store's %.3g\" field lies outside the picture (black)", path,
                     100 * masked[0], spec.angular_size)
        p = pixels[0]
    return p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p.astype(np.float32)


def store_precision(store: EmbeddingStore) -> str:
    """The precision a query image is encoded in: the one the store's rows were made in when it records
    exactly one (so a stored cutout given back as a query scores 1.0 against itself), else ``auto``."""
    made = store.attrs.get("precisions") or []
    return made[0] if len(made) == 1 else "auto"


def query_image(store: EmbeddingStore, path: str, model: str | None, device: str = "cpu",
                image_scale: dict | None = None) -> Query:
    from galaxalign_batch.downstream.classify import check_model
    from galaxalign_batch.engine.encoder import load_encoder

    if not model:
        m = store.attrs.get("model") or {}
        raise ConfigError(f"--image needs --model: the model the store was embedded with ({m.get('kind')} "
                          f"{m.get('name')}, id {m.get('id')}) encodes the image")
    pixels = read_query_image(path, store.cutout_spec, image_scale)
    encoder = load_encoder(model, device=device, precision=store_precision(store))
    check_model(store, encoder.identity)
    vec = encoder.encode(pixels[None])[0]
    return Query("image", os.fspath(path), vec.astype(np.float32), pixels=pixels)


class QueryModels:
    """The store's model, loaded once for every query that needs it (image, text, symbol) of a batch."""

    def __init__(self, store: EmbeddingStore, model: str | None, device: str = "cpu"):
        self.store, self.model, self.device = store, model, device
        self._encoder = None
        self._towers = None

    def encoder(self):
        from galaxalign_batch.downstream.classify import check_model
        from galaxalign_batch.engine.encoder import load_encoder

        if self._encoder is None:
            enc = load_encoder(self.model, device=self.device, precision=store_precision(self.store))
            check_model(self.store, enc.identity)
            self._encoder = enc
        return self._encoder

    def towers(self, need: str):
        from galaxalign_batch.downstream.towers import load_towers

        if self._towers is None:
            self._towers = load_towers(self.store, self.model, need=need, device=self.device)
        return self._towers


def query_text(store: EmbeddingStore, text: str, model: str | None, device: str = "cpu", *,
               models: QueryModels | None = None) -> Query:
    """A text (``"barred spiral galaxy with two arms"``) through the store's model's text tower."""
    text = " ".join(str(text).split())
    if not text:
        raise ConfigError("--text: empty text")
    towers = (models or QueryModels(store, model, device)).towers("text")
    vec = towers.encode_text([text])[0]
    return Query("text", text, _unit(vec, "text"), note=f"text tower of the {towers.describe}")


def query_symbol(store: EmbeddingStore, path: str, model: str | None, device: str = "cpu", *,
                 models: QueryModels | None = None) -> Query:
    """A drawn symbol (an image file: a sketch, dark on light or light on dark) through the symbol encoder."""
    from galaxalign_batch.downstream.towers import read_sketch

    towers = (models or QueryModels(store, model, device)).towers("symbol")
    pixels = read_sketch(path, towers.symbol_size)
    vec = towers.encode_symbols(pixels[None])[0]
    if towers.symbol_note:
        log.warning("--symbol: %s", towers.symbol_note)
    note = "symbol encoder of the " + towers.describe if not towers.symbol_note else towers.symbol_note
    return Query("symbol", os.fspath(path), _unit(vec, "symbol"), pixels=pixels, note=note)


def _unit(vec: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(vec, np.float32)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise QueryError(f"the {what} embedding is not finite or zero")
    return v / norm


# ---------------------------------------------------------------------------------------------- batches

def read_queries(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The queries of a ``--queries`` file: ``[(kind, value), ...]`` in file order.

    A text file, one query per line: ``KIND VALUE`` with KIND one of object, near, image, text,
    symbol (``text barred spiral galaxy with two arms``, ``object 10000/1501p022/17``,
    ``near 150.12,2.25``); blank lines and lines starting with ``#`` are skipped. Or a CSV
    (``.csv``) with a header naming the columns ``kind`` and ``query``, one query per row. Image and
    symbol paths are taken relative to the file's folder when they are not found as given.
    """
    import csv

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--queries {path}: no such file")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--queries {path}: cannot read as UTF-8 text ({e})") from None
    items: list[tuple[str, str, int]] = []
    if path.lower().endswith(".csv"):
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            raise ConfigError(f"--queries {path}: empty")
        header = [h.strip().lower() for h in rows[0]]
        if "kind" not in header or "query" not in header:
            raise ConfigError(f"--queries {path}: a CSV needs the columns kind and query in its header "
                              f"(found: {', '.join(rows[0])})")
        ik, iq = header.index("kind"), header.index("query")
        for n, row in enumerate(rows[1:], start=2):
            if not any(c.strip() for c in row):
                continue
            if len(row) <= max(ik, iq):
                raise ConfigError(f"--queries {path}: line {n} has {len(row)} field(s), the header {len(header)}")
            items.append((row[ik].strip().lower(), row[iq].strip(), n))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, value = line.partition(" ")
            items.append((kind.strip().lower().rstrip(":"), value.strip(), n))
    out = []
    base = os.path.dirname(os.path.abspath(path))
    for kind, value, n in items:
        if kind not in QUERY_KINDS:
            raise ConfigError(f"--queries {path}: line {n}: unknown query kind {kind!r} (one of {', '.join(QUERY_KINDS)}, "
                              "then the query, e.g. 'text barred spiral galaxy' or 'object 10000/1501p022/17')")
        if not value:
            raise ConfigError(f"--queries {path}: line {n}: {kind} without a value")
        if kind in ("image", "symbol") and not os.path.isabs(value) and not os.path.exists(value):
            candidate = os.path.join(base, value)
            if os.path.exists(candidate):
                value = candidate
        out.append((kind, value))
    if not out:
        raise ConfigError(f"--queries {path}: no query in the file")
    return out


def run_queries(store: EmbeddingStore, items: Sequence[tuple[str, str]], *, model: str | None = None,
                radius_arcsec: float = 5.0, device: str = "cpu", image_scale: dict | None = None) -> list[Query]:
    """The :class:`Query` of every ``(kind, value)`` (see :func:`read_queries`); the model is loaded once.
    ``image_scale``: what the picture queries show (:func:`read_query_image`)."""
    models = QueryModels(store, model, device)
    return [_one_query(store, kind, value, models, radius_arcsec, image_scale) for kind, value in items]


def _one_query(store: EmbeddingStore, kind: str, value: str, models: QueryModels, radius_arcsec: float,
               image_scale: dict | None = None) -> Query:
    if kind == "object":
        return query_object(store, value)
    if kind == "near":
        return query_near(store, value, radius_arcsec)
    if kind == "text":
        return query_text(store, value, models.model, models.device, models=models)
    if kind == "symbol":
        return query_symbol(store, value, models.model, models.device, models=models)
    if kind == "image":
        if not models.model:
            return query_image(store, value, None)  # the one-line error naming the store's model
        pixels = read_query_image(value, store.cutout_spec, image_scale)
        vec = models.encoder().encode(pixels[None])[0]
        return Query("image", os.fspath(value), vec.astype(np.float32), pixels=pixels)
    raise ConfigError(f"unknown query kind {kind!r} (one of {', '.join(QUERY_KINDS)})")


def batch_table(results: Sequence["SearchResult"]):
    """One table of a batch's results: ``query_index``, ``query`` (kind and value), then each result's columns."""
    import pandas as pd

    parts = []
    for i, r in enumerate(results):
        t = r.table.copy()
        t.insert(0, "query", f"{r.query.kind} {r.query.text}")
        t.insert(0, "query_index", i)
        parts.append(t)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ---------------------------------------------------------------------------------------------- the search

def search_store(store: EmbeddingStore, query: Query, k: int = 10, *, index: str = "auto",
                 rebuild_index: bool = False, target_recall: float = 0.95,
                 dedup_arcsec: float | None = None, address: str | None = None) -> SearchResult:
    """The ``k`` stored rows most similar to ``query`` with a table of their ids, positions, scores, labels.

    ``dedup_arcsec``: a result closer on the sky than this to a better-scoring result is the same
    object and is left out (counted in the ``duplicates`` column of the one kept); more candidates
    are taken so that ``k`` distinct objects remain when the store has them.
    """
    return search_many(store, [query], k, index=index, rebuild_index=rebuild_index, target_recall=target_recall,
                       dedup_arcsec=dedup_arcsec, address=address)[0]


def search_many(store: EmbeddingStore, queries: Sequence[Query], k: int = 10, *, index: str = "auto",
                rebuild_index: bool = False, target_recall: float = 0.95,
                dedup_arcsec: float | None = None, address: str | None = None) -> list[SearchResult]:
    """:func:`search_store` for several queries, in one pass over the store (exact) or one index search.
    ``address``: a Ray cluster on which a sharded IVF index is built when one must be built (docs/downstream.md)."""
    n = store.n_rows
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"-k must be a positive integer, got {k!r}")
    if k > n:  # as head -n: all there is, said once
        log.warning("-k %d is larger than the store (%d rows): returning all %d", k, n, n)
        k = n
    if index not in INDEX_CHOICES:
        raise ConfigError(f"--index must be one of {', '.join(INDEX_CHOICES)}, got {index!r}")
    if dedup_arcsec is not None and not (np.isfinite(dedup_arcsec) and dedup_arcsec > 0):
        raise ConfigError(f"--dedup must be a positive angle in arcsec, got {dedup_arcsec!r}")
    if not queries:
        return []
    for query in queries:
        if query.vector.shape != (store.dim,):
            raise QueryError(f"query vector has shape {query.vector.shape}, the store's embeddings are ({store.dim},)")
    kind = index
    if kind == "auto":
        kind = "ivf" if n >= APPROX_THRESHOLD else "exact"
    q = np.stack([query.vector for query in queries]).astype(np.float32)
    build_kw = {"address": address} if address and kind == "ivf" else {}
    idx = (get_index(store, kind, rebuild=rebuild_index, target_recall=target_recall, **build_kw)
           if kind != "exact" else None)
    method = f"exact ({n} rows, fused top-k)" if idx is None else idx.describe()
    extra: dict = {} if idx is None else {"index": idx.meta}
    fetch = k if dedup_arcsec is None else min(n, max(4 * k, k + 16))
    pending = list(range(len(queries)))
    picked: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    while pending:
        scores, rows = _top(store, q[pending], fetch, idx)
        again = []
        for i, sc, rw in zip(pending, scores, rows):
            keep = rw >= 0
            sc, rw = sc[keep], rw[keep].astype(np.int64)
            if dedup_arcsec is None:
                picked[i] = (rw[:k], sc[:k], np.zeros(0, np.int64))
                continue
            kept, dup = dedup_on_sky(store, rw, dedup_arcsec, k)
            if len(kept) < k and fetch < n and len(rw) == fetch:
                again.append(i)  # too many duplicates among the candidates: look further
            else:
                picked[i] = (rw[kept], sc[kept], dup)
        pending = again
        fetch = min(n, 4 * fetch)
    if dedup_arcsec is not None:
        method += f", results within {dedup_arcsec:g} arcsec of a better one merged"
    out = []
    cls = classification_of(store)
    for i, query in enumerate(queries):
        rows, scores, dup = picked[i]
        out.append(SearchResult(query, rows, np.asarray(scores, np.float32), _table(store, rows, scores, dup, cls,
                                                                                 dedup_arcsec is not None),
                                method, dict(extra)))
    return out


def _top(store: EmbeddingStore, q: np.ndarray, k: int, idx) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, rows) of each query row of ``q`` (Q, D): exact through the fused kernel, or the index."""
    import torch

    from galaxalign_batch import ops

    if idx is None:
        _, shard = store.chunking
        scores, rows = ops.similarity_topk(torch.from_numpy(np.ascontiguousarray(q)), store.embeddings, k,
                                           chunk_rows=shard)
        return scores.numpy(), rows.numpy()
    scores, rows = idx.search(q, k)
    return np.asarray(scores), np.asarray(rows)


def dedup_on_sky(store: EmbeddingStore, rows: np.ndarray, arcsec: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy suppression of sky duplicates among ``rows`` (best score first).

    Returns ``(kept, duplicates)``: the positions in ``rows`` of at most ``k`` results none of which
    lies within ``arcsec`` of a better-scoring kept one, and for each kept one how many of ``rows``
    were merged into it (within ``arcsec`` of it; of two kept ones, the nearer).
    """
    rows = np.asarray(rows, np.int64)
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(rows)
    ra, dec = np.empty(len(rows)), np.empty(len(rows))
    ra[order], dec[order] = store.read("ra", rows[order]), store.read("dec", rows[order])
    xyz = radec_to_xyz(ra, dec)
    limit = float(chord_from_arcsec(arcsec))
    kept: list[int] = []
    dup: list[int] = []
    for i in range(len(rows)):
        if kept:
            d = np.linalg.norm(xyz[kept] - xyz[i], axis=1)
            j = int(np.argmin(d))
            if d[j] < limit:
                dup[j] += 1
                continue
        if len(kept) == k:
            continue  # only duplicates of the k kept ones are counted from here on
        kept.append(i)
        dup.append(0)
    return np.asarray(kept, np.int64), np.asarray(dup, np.int64)


def _table(store: EmbeddingStore, rows: np.ndarray, scores: np.ndarray, dup: np.ndarray, cls, with_dup: bool):
    import pandas as pd

    ra, dec = store.read("ra", rows), store.read("dec", rows)
    table = pd.DataFrame({"rank": np.arange(len(rows)), "object_id": store.read("object_id", rows), "ra": ra,
                          "dec": dec, "score": np.asarray(scores, np.float64)})
    if cls is not None:
        table["label"] = cls.key_of(store.read("label", rows))
        table["confidence"] = store.read("confidence", rows).astype(np.float64)
    if with_dup:
        table["duplicates"] = np.asarray(dup, np.int64)
    table["viewer"] = [viewer_url(a, b) for a, b in zip(ra, dec)]
    return table


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
    qtext = os.path.basename(result.query.text) if result.query.kind in ("image", "symbol") else result.query.text
    panels.append((f"query\n{_short(qtext)}", qpix if result.query.kind != "text" else _TEXT_PANEL))
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
    for i, (ax, (title, pix)) in enumerate(zip(axes.flat, panels)):
        if pix is _TEXT_PANEL:
            import textwrap

            ax.text(0.5, 0.5, "\n".join(textwrap.wrap(result.query.text, 22)[:6]), ha="center", va="center",
                    fontsize=8, style="italic")
            title = "query (text)"
        elif pix is None:
            ax.text(0.5, 0.5, "tile not found", ha="center", va="center", fontsize=8)
        else:  # a drawn symbol is shown as drawn; cutouts north up
            orientation = "north-up" if i == 0 and result.query.kind == "symbol" else store.cutout_spec.orientation
            ax.imshow(to_rgb8(pix, orientation), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    try:
        with atomic.replacing(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    missing = sum(p is None for _, p in panels)  # the text panel is not a picture
    if missing:
        log.warning("%d of %d pictures could not be re-made (tiles not found: pass --survey ROOT)", missing, len(panels))
    return path


_TEXT_PANEL = np.zeros((3, 1, 1), np.float32)  # marks the query panel of a text query (no picture)


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


def run_query(store: EmbeddingStore, *, object_id: str | None = None, near: str | None = None,
              image: str | None = None, text: str | None = None, symbol: str | None = None,
              model: str | None = None, radius_arcsec: float = 5.0, device: str = "cpu",
              image_scale: dict | None = None) -> Query:
    """The :class:`Query` of exactly one of ``object_id``, ``near``, ``image``, ``text``, ``symbol``
    (``image_scale``: what a picture query shows, :func:`read_query_image`)."""
    given = [(k, v) for k, v in (("object", object_id), ("near", near), ("image", image), ("text", text),
                                 ("symbol", symbol)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one query: --object ID, --near RA,DEC, --image FILE, --text TEXT or "
                          "--symbol FILE")
    kind, value = given[0]
    if kind == "image":
        return query_image(store, value, model, device, image_scale)
    return _one_query(store, kind, value, QueryModels(store, model, device), radius_arcsec)
