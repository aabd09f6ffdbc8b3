"""The Zarr embedding store: commits, exactly-once bookkeeping, plain-zarr/dask readability."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from galaxalign_batch.store import EmbeddingStore, StoreError, open_store, schema


def _rows(n: int, tile: str, dim: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return dict(embedding=rng.normal(size=(n, dim)).astype(np.float32),
                object_id=np.array([f"{tile}/det{i}" for i in range(n)]),
                ra=rng.uniform(0, 360, n), dec=rng.uniform(-89, 89, n), tile=np.full(n, tile),
                x=rng.uniform(0, 100, n).astype(np.float32), y=rng.uniform(0, 100, n).astype(np.float32),
                masked_fraction=np.array([0.0, 0.2, 0.7][:n] + [0.0] * max(0, n - 3), np.float32))


def test_commit_reopen_finalize(tmp_path):
    path = tmp_path / "s.zarr"
    s = EmbeddingStore.create(path, 8, attrs={"model_id": "abc"})
    assert s.commit([("t1", _rows(3, "t1"), ""), ("bad", None, "bad.fits: truncated FITS file")]) == 3
    s = open_store(path, "r+")
    assert s.n_rows == 3 and s.completed_tiles() == {"t1"}
    assert s.failed_tiles() == {"bad": "bad.fits: truncated FITS file"}
    s.commit([("t2", _rows(4, "t2", seed=1), "")])
    s.finalize()
    g = zarr.open_group(path, mode="r")
    assert g["embedding"].shape == (7, 8) and g["embedding"].dtype == np.float16
    assert list(g["object_id"][:3]) == ["t1/det0", "t1/det1", "t1/det2"]
    assert g.attrs["complete"] is True and g.attrs["model_id"] == "abc"
    flags = g["flags"][:3]
    assert flags[0] == 0 and flags[1] == schema.FLAG_MASKED and flags[2] == schema.FLAG_MASKED | schema.FLAG_MOSTLY_MASKED


def test_healpix_nested_matches_astropy_healpix(tmp_path):
    from astropy_healpix import HEALPix
    import astropy.units as u

    s = EmbeddingStore.create(tmp_path / "s.zarr", 8)
    rows = _rows(5, "t")
    s.commit([("t", rows, "")])
    hp = HEALPix(nside=2 ** 10, order="nested")
    coarse = s.read("healpix") >> (2 * (schema.HEALPIX_ORDER - 10))
    assert np.array_equal(coarse, hp.lonlat_to_healpix(rows["ra"] * u.deg, rows["dec"] * u.deg))


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path):
    path = tmp_path / "s.zarr"
    s = EmbeddingStore.create(path, 8)
    s.commit([("t1", _rows(3, "t1"), "")])
    # Simulate a crash after rows were written but before the commit: garbage beyond row 3.
    s.group["ra"].resize((10,))
    s.group["ra"][3:10] = -1.0
    s = open_store(path, "r+")
    assert len(s.read("ra")) == 3
    s.commit([("t2", _rows(2, "t2", seed=5), "")])
    assert (s.read("ra") >= 0).all() and s.n_rows == 5


def test_tile_written_twice_is_refused(tmp_path):
    s = EmbeddingStore.create(tmp_path / "s.zarr", 8)
    s.commit([("t1", _rows(2, "t1"), "")])
    with pytest.raises(StoreError, match="written twice"):
        s.commit([("t1", _rows(2, "t1"), "")])


def test_dask_and_errors(tmp_path):
    import dask.array as da

    path = tmp_path / "s.zarr"
    s = EmbeddingStore.create(path, 8)
    s.commit([("t1", _rows(3, "t1"), "")])
    s.finalize()
    assert da.from_zarr(str(path), component="embedding").shape == (3, 8)
    with pytest.raises(StoreError, match="already exists"):
        EmbeddingStore.create(path, 8)
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "nope.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not a galaxalign embedding store"):
        open_store(tmp_path / "other.zarr")
