"""`join`: positional cross-match against brute force (RA wrap, poles, ties), catalog formats, key join, errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from astropy.coordinates import angular_separation
from astropy.table import Table

from galaxalign_batch import atomic
from galaxalign_batch.cli import main
from galaxalign_batch.downstream.catalogs import read_catalog
from galaxalign_batch.downstream.classify import Scorer, classify_store
from galaxalign_batch.downstream.common import CatalogError, classification_of
from galaxalign_batch.downstream.join import join_catalog, match_positions
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore, open_store

MODEL = {"id": "synthetic-0", "name": "synthetic", "kind": "test"}
DIM = 8


def _regions(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in four small regions: across RA 0/360, at both poles, and an ordinary field."""
    part = n // 4
    ra = np.concatenate([rng.uniform(-0.05, 0.05, part) % 360.0,            # RA wrap
                         rng.uniform(0, 360, part),                          # north pole cap
                         rng.uniform(0, 360, part),                          # south pole cap
                         rng.uniform(150.0, 150.1, n - 3 * part)])
    dec = np.concatenate([rng.uniform(-0.05, 0.05, part),
                          90.0 - np.degrees(np.arccos(rng.uniform(np.cos(np.radians(0.05)), 1, part))),
                          -90.0 + np.degrees(np.arccos(rng.uniform(np.cos(np.radians(0.05)), 1, part))),
                          rng.uniform(2.0, 2.1, n - 3 * part)])
    return ra, dec


def _offset(ra, dec, arcsec, rng):
    """Positions moved by ``arcsec`` in random directions (exact on the sphere)."""
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    c = SkyCoord(ra * u.deg, dec * u.deg)
    moved = c.directional_offset_by(rng.uniform(0, 360, len(ra)) * u.deg, arcsec * u.arcsec)
    return moved.ra.deg, moved.dec.deg


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 4000
    ra, dec = _regions(rng, n)
    ra[1], dec[1] = ra[0], dec[0]  # an exact duplicate position: ties go to the lower row
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("join") / "s.zarr"
    store = EmbeddingStore.create(path, DIM, attrs={"model": MODEL, "vocabulary": None, "cutout_spec": None},
                                  rows_per_chunk=128)
    step = 500
    for t, s in enumerate(range(0, n, step)):
        sl = slice(s, s + step)
        m = len(ra[sl])
        store.commit([(f"tile{t}", dict(embedding=emb[sl], object_id=np.array([f"tile{t}/det{i}" for i in range(m)]),
                                        ra=ra[sl], dec=dec[sl], tile=np.full(m, f"tile{t}"),
                                        x=np.zeros(m, np.float32), y=np.zeros(m, np.float32),
                                        masked_fraction=np.zeros(m, np.float32)), "")])
    store.finalize()
    return path


@pytest.fixture(scope="module")
def catalog(store_path):
    """600 rows: 300 near stored sources (0.1-1.5 arcsec away), 300 anywhere in the same regions."""
    rng = np.random.default_rng(1)
    s = open_store(store_path)
    sra, sdec = s.read("ra"), s.read("dec")
    pick = rng.choice(len(sra), 300, replace=False)
    pick[0] = 0  # the duplicated position, exactly
    near_ra, near_dec = _offset(sra[pick], sdec[pick], rng.uniform(0.1, 1.5, 300), rng)
    near_ra[0], near_dec[0] = sra[0], sdec[0]
    far_ra, far_dec = _regions(rng, 300)
    return np.concatenate([near_ra, far_ra]), np.concatenate([near_dec, far_dec])


def brute_force(store_path, ra, dec, radius_arcsec):
    s = open_store(store_path)
    sra, sdec = np.radians(s.read("ra")), np.radians(s.read("dec"))
    rows = np.full(len(ra), -1)
    seps = np.full(len(ra), np.nan)
    for i, (a, d) in enumerate(zip(np.radians(ra), np.radians(dec))):
        sep = np.degrees(angular_separation(a, d, sra, sdec)) * 3600.0
        j = int(np.argmin(sep))  # first minimum: the lower row on ties
        if sep[j] <= radius_arcsec:
            rows[i], seps[i] = j, sep[j]
    return rows, seps


@pytest.mark.parametrize("radius", [1.0, 20.0])
def test_match_equals_brute_force_across_wrap_and_poles(store_path, catalog, radius):
    ra, dec = catalog
    want_rows, want_sep = brute_force(store_path, ra, dec, radius)
    rows, sep = match_positions(open_store(store_path), ra, dec, radius, task_rows=256, workers=2)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sep, want_sep, atol=1e-6, equal_nan=True)
    assert (rows >= 0).sum() > 100 and (radius > 1 or (rows < 0).sum() > 100)
    assert rows[0] == 0  # the exact duplicate pair: the lower row wins
    # every region took part: matches across the RA wrap and at both poles
    dec_m = dec[rows >= 0]
    assert (dec_m > 89.9).any() and (dec_m < -89.9).any() and (np.abs(dec_m) < 0.1).any()


def test_nan_and_out_of_range_positions_never_match(store_path):
    s = open_store(store_path)
    ra = np.array([s.read("ra")[5], np.nan, 10.0])
    dec = np.array([s.read("dec")[5], 0.0, 95.0])
    rows, sep = match_positions(s, ra, dec, 1.0)
    assert rows.tolist() == [5, -1, -1] and np.isnan(sep[1:]).all()


def _write(table: Table, path, fmt: str):
    if fmt == "fits":
        table.write(path, format="fits")
    elif fmt == "csv":
        table.write(path, format="ascii.csv")
    else:
        table.write(path, format="parquet")


@pytest.mark.parametrize("fmt,ra_name,dec_name", [("fits", "RAJ2000", "DEJ2000"), ("csv", "ra_deg", "dec_deg"),
                                                  ("parquet", "RA", "DEC")])
def test_catalog_formats_and_column_names(store_path, catalog, tmp_path, fmt, ra_name, dec_name):
    ra, dec = catalog
    t = Table({"name": [f"obj{i}" for i in range(len(ra))], ra_name: ra, dec_name: dec,
               "mag": np.linspace(18, 22, len(ra)).astype(np.float32)})
    cat = tmp_path / f"cat.{fmt}"
    _write(t, cat, fmt)
    out = tmp_path / "out.parquet"
    summary = join_catalog(store_path, cat, out, radius=1.0)
    got = pq.read_table(out)
    want_rows, want_sep = brute_force(store_path, ra, dec, 1.0)
    assert got.num_rows == len(ra) and summary.matched == int((want_rows >= 0).sum())
    rows = np.asarray(got.column("store_row").to_pandas().fillna(-1), dtype=np.int64)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(got.column("separation_arcsec").to_numpy(zero_copy_only=False), want_sep,
                               atol=1e-6, equal_nan=True)
    assert got.column("name").to_pylist() == list(t["name"])  # catalog columns kept, in order
    ids = got.column("object_id").to_pylist()
    s = open_store(store_path)
    assert ids[0] == str(s.read("object_id")[0])
    assert all(i is None for i, r in zip(ids, rows) if r < 0)
    assert "label" not in got.column_names  # not classified yet


def test_fits_units_are_converted(store_path, catalog, tmp_path):
    import astropy.units as u

    ra, dec = catalog
    t = Table({"RA": np.radians(ra) * u.rad, "DEC": np.radians(dec) * u.rad})
    t.write(tmp_path / "rad.fits")
    join_catalog(store_path, tmp_path / "rad.fits", tmp_path / "o.parquet", radius=1.0)
    rows = pq.read_table(tmp_path / "o.parquet").column("store_row").to_pandas().fillna(-1).to_numpy()
    np.testing.assert_array_equal(rows, brute_force(store_path, ra, dec, 1.0)[0])


def test_explicit_columns_inner_and_embedding(store_path, catalog, tmp_path):
    ra, dec = catalog
    pq.write_table(pa.table({"alpha_x": ra, "delta_x": dec}), tmp_path / "c.parquet")
    out = tmp_path / "o.parquet"
    with pytest.raises(CatalogError, match="no recognisable RA column"):
        join_catalog(store_path, tmp_path / "c.parquet", out, radius=1.0)
    assert not out.exists()
    join_catalog(store_path, tmp_path / "c.parquet", out, radius=1.0, ra_col="alpha_x", dec_col="delta_x",
                 inner=True, with_embedding=True)
    got = pq.read_table(out)
    want_rows = brute_force(store_path, ra, dec, 1.0)[0]
    rows = got.column("store_row").to_numpy()
    np.testing.assert_array_equal(rows, want_rows[want_rows >= 0])
    emb = np.asarray(got.column("embedding").to_pylist(), np.float32)
    np.testing.assert_array_equal(emb, open_store(store_path).read("embedding", rows).astype(np.float32))


def test_key_join(store_path, tmp_path):
    s = open_store(store_path)
    ids = [str(s.read("object_id")[i]) for i in (7, 3999, 1200)] + ["not/in/store"]
    pq.write_table(pa.table({"object_id": ids, "score": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "k.parquet")
    out = tmp_path / "o.parquet"
    summary = join_catalog(store_path, tmp_path / "k.parquet", out, on="object_id")
    got = pq.read_table(out)
    assert summary.matched == 3
    assert got.column("store_row").to_pylist() == [7, 3999, 1200, None]
    assert got.column("store_object_id").to_pylist() == ids[:3] + [None]  # renamed: the catalog has object_id
    with pytest.raises(CatalogError, match="no column 'oid'"):
        join_catalog(store_path, tmp_path / "k.parquet", out, on="oid")


def test_classification_columns(store_path, catalog, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("cls") / "s.zarr"
    shutil.copytree(store_path, path)
    protos = torch.nn.functional.normalize(torch.randn(3, DIM, generator=torch.Generator().manual_seed(0)), dim=-1)

    def score(st, start, stop):
        from galaxalign_batch import ops

        return ops.prototype_probs(torch.from_numpy(st.group["embedding"][start:stop]).float(), protos, 10.0).numpy()

    classify_store(path, Scorer(MODEL, "combined", ["a", "b", "c"], ["A", "B", "C"], score))
    assert classification_of(open_store(path)).classes == ["a", "b", "c"]
    ra, dec = catalog
    pq.write_table(pa.table({"ra": ra, "dec": dec}), path.parent / "c.parquet")
    join_catalog(path, path.parent / "c.parquet", path.parent / "o.parquet", radius=1.0, inner=True)
    got = pq.read_table(path.parent / "o.parquet")
    s = open_store(path)
    rows = got.column("store_row").to_numpy()
    probs = np.asarray(got.column("probs").to_pylist(), np.float32)
    np.testing.assert_array_equal(probs, s.read("probs", rows))
    assert got.column("label").to_pylist() == [["a", "b", "c"][i] for i in s.read("label", rows)]
    np.testing.assert_array_equal(got.column("confidence").to_numpy(), probs.max(1))
    import json

    meta = json.loads(got.schema.metadata[b"galaxalign_join"])
    assert meta["classes"] == ["a", "b", "c"] and meta["model"]["id"] == MODEL["id"]


def test_bad_inputs_one_line_errors_and_nothing_written(store_path, tmp_path, caplog):
    (tmp_path / "notes.csv").write_text("name,mag\nx,1\ny,2\n")
    out = tmp_path / "o.parquet"
    assert main(["--no-progress", "join", "--store", str(store_path), "--catalog", str(tmp_path / "notes.csv"),
                 "--out", str(out), "--radius", "1arcsec"]) == 1
    assert not out.exists() and not atomic.partials(tmp_path)
    err = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(err) == 1 and "no recognisable RA column" in err[0] and "\n" not in err[0]
    (tmp_path / "junk.fits").write_bytes(b"not a fits file at all")
    with pytest.raises(CatalogError, match="cannot read as a fits table"):
        read_catalog(tmp_path / "junk.fits")
    (tmp_path / "notes.txt.bz2").write_text("x")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        read_catalog(tmp_path / "notes.txt.bz2")
    caplog.clear()
    assert main(["join", "--store", str(store_path), "--catalog", str(tmp_path / "notes.csv"), "--out", str(out),
                 "--radius", "one arcsec"]) == 1
    assert any("expected an angle" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="Parquet"):
        join_catalog(store_path, tmp_path / "notes.csv", tmp_path / "o.csv", radius=1.0)


def test_cli_join_prints_summary(store_path, catalog, tmp_path, capsys):
    ra, dec = catalog
    Table({"RA": ra, "Dec": dec}).write(tmp_path / "c.csv", format="ascii.csv")
    out = tmp_path / "o.parquet"
    assert main(["--no-progress", "join", "--store", str(store_path), "--catalog", str(tmp_path / "c.csv"),
                 "--out", str(out), "--radius", "0.00028deg"]) == 0
    text = capsys.readouterr().out
    assert "600 catalog rows" in text and "separation_arcsec" in text
    assert pq.read_table(out).num_rows == 600
