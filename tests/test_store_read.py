"""The store's read API (columns, rows, chunked iteration, the embeddings view, open_readable) and its one
writer of derived results (DerivedWriter): resumable, and never half-visible after a kill at any write."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import zarr

from galaxalign_batch import lease
from galaxalign_batch.store import (DerivedArray, DerivedWriter, EmbeddingStore, StoreCorruptError, StoreError,
                                    io as store_io, label_counts, open_readable, open_store,
                                    probability_arrays, probability_columns)

DIM = 8
TILES = [("a", 9), ("b", 0), ("c", 13)]  # 22 rows in chunks of 4 rows
ARRAYS = [DerivedArray("score", "float32", 0.0, "ra / 360"),
          DerivedArray("pos", "float64", 0.0, "ra, dec", width=2, dimension="coordinate")]


def _rows(name: str, n: int) -> dict:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    emb = rng.normal(size=(n, DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return dict(embedding=emb.astype(np.float32), object_id=np.array([f"{name}/det{i}" for i in range(n)]),
                ra=rng.uniform(0, 360, n), dec=rng.uniform(-80, 80, n), tile=np.full(n, name),
                x=rng.uniform(0, 50, n).astype(np.float32), y=rng.uniform(0, 50, n).astype(np.float32),
                masked_fraction=rng.uniform(0, 1, n).astype(np.float32))


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "s.zarr"
    s = EmbeddingStore.create(path, DIM, attrs={"model": {"id": "synthetic"}}, rows_per_chunk=4)
    s.commit([(name, _rows(name, n), "") for name, n in TILES])
    s.finalize()
    return path


def _expected(column: str) -> np.ndarray:
    return np.concatenate([_rows(name, n)[column] for name, n in TILES])


# ---------------------------------------------------------------------------------------------- reading

def test_columns_contains_and_chunking(store_path):
    s = open_store(store_path)
    assert s.columns == tuple(sorted(["embedding", "object_id", "ra", "dec", "healpix", "tile", "x", "y",
                                      "masked_fraction", "flags"]))
    assert "ra" in s and "tiles/name" in s and "probs" not in s
    assert s.chunking == (4, 128)


def test_read_columns_checks_embeddings_and_indices(store_path):
    s = open_store(store_path)
    cols = s.read_columns(["ra", "object_id", "embedding"], slice(3, 11))
    assert list(cols) == ["ra", "object_id", "embedding"]
    np.testing.assert_array_equal(cols["ra"], _expected("ra")[3:11])
    assert list(cols["object_id"].astype(object)) == list(_expected("object_id")[3:11])
    np.testing.assert_allclose(cols["embedding"].astype(np.float32), _expected("embedding")[3:11], atol=2e-3)
    picked = s.read_columns(["dec"], np.array([21, 0, 5]))
    np.testing.assert_array_equal(picked["dec"], _expected("dec")[[21, 0, 5]])
    with pytest.raises(IndexError):
        s.read_columns(["dec"], np.array([22]))


def test_iter_chunks_whole_chunks_committed_rows_only(store_path):
    s = open_store(store_path, "r+")
    # rows beyond the commit record (a crashed run) are never yielded
    s.group["ra"].resize((40,))
    s.group["ra"][22:40] = -1.0
    s = open_store(store_path)
    batches = list(s.iter_chunks(["ra", "x"], step=6))  # rounded down to one chunk (4 rows)
    assert [b for b, _ in batches] == list(range(0, 22, 4))
    assert all(len(c["ra"]) == 4 for _, c in batches[:-1]) and len(batches[-1][1]["ra"]) == 2
    np.testing.assert_array_equal(np.concatenate([c["ra"] for _, c in batches]), _expected("ra"))
    np.testing.assert_array_equal(np.concatenate([c["x"] for _, c in batches]), _expected("x"))
    whole = list(s.iter_chunks(["ra"]))  # default: one shard file at a time
    assert len(whole) == 1 and len(whole[0][1]["ra"]) == 22
    part = list(s.iter_chunks(["object_id"], step=8, start=4, stop=18))
    assert [b for b, _ in part] == [4, 12] and sum(len(c["object_id"]) for _, c in part) == 14


def test_iter_chunks_names_a_missing_chunk(store_path):
    os.remove(store_path / "x" / "c" / "0")
    s = open_store(store_path)
    with pytest.raises(StoreCorruptError, match=r"array x, chunk 0 .*missing"):
        list(s.iter_chunks(["ra", "x"]))


def test_embeddings_view(store_path):
    s = open_store(store_path)
    view = s.embeddings
    assert view.shape == (22, DIM) and len(view) == 22 and view.dtype == np.float16
    np.testing.assert_allclose(np.asarray(view[5:9], np.float32), _expected("embedding")[5:9], atol=2e-3)
    with pytest.raises(TypeError):
        view[3]
    zarr.open_group(store_path, mode="r+")["embedding"][4:8] = 0  # a chunk of zeros can only be damage
    with pytest.raises(StoreCorruptError, match="not 1"):
        open_store(store_path).embeddings[0:8]


def test_open_readable(tmp_path, store_path):
    assert open_readable(store_path).n_rows == 22
    EmbeddingStore.create(tmp_path / "empty.zarr", DIM)
    with pytest.raises(StoreError, match="no rows yet"):
        open_readable(tmp_path / "empty.zarr")
    with pytest.raises(StoreError, match="no such store"):
        open_readable(tmp_path / "nothing.zarr")


# ---------------------------------------------------------------------------------------------- derived results

def _writer(store, dest, version=1):
    partial = "_t_partial" if not dest else f"_t_partial/{dest.split('/')[-1]}"
    return DerivedWriter(store, dest=dest, partial=partial, arrays=ARRAYS, signature={"v": version, "rows": store.n_rows},
                         attr="test", entry=dest.split("/")[-1] if dest else None, parent_description="tests",
                         what="test result")


def _values(store, version):
    def compute(start, stop):
        c = store.read_columns(["ra", "dec"], slice(start, stop))
        return {"score": (c["ra"] / 360.0 * version).astype(np.float32), "pos": np.stack([c["ra"], c["dec"] * version], 1)}
    return compute


def _run(path, dest, version=1, step=8, compute=None):
    with lease.locked(path):
        s = open_store(path, "r+")
        w = _writer(s, dest, version)
        done = w.begin()
        w.write(compute or _values(s, version), step=step)
        w.install({"version": version, "rows": s.n_rows})
        return done


def _visible(path, dest):
    """What a reader sees: None, or (version, score, pos)."""
    s = open_store(path)
    meta = s.attrs.get("test")
    if dest:
        meta = (meta or {}).get(dest.split("/")[-1])
    if not meta:
        return None
    pre = f"{dest}/" if dest else ""
    return meta["version"], s.read(pre + "score"), s.read(pre + "pos")


def _reference(path, dest, version):
    ra, dec = _expected("ra"), _expected("dec")
    return version, (ra / 360.0 * version).astype(np.float32), np.stack([ra, dec * version], 1)


def _same(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


@pytest.mark.parametrize("dest", ["", "results/mine"])
def test_derived_writer_installs_and_removes_its_work_area(store_path, dest):
    assert _run(store_path, dest) == 0
    assert _same(_visible(store_path, dest), _reference(store_path, dest, 1))
    s = open_store(store_path)
    assert "_t_partial" not in s and not (store_path / "_t_partial").exists()
    arr = zarr.open_group(store_path, mode="r")[f"{dest}/pos" if dest else "pos"]
    assert arr.chunks == (4, 2) and arr.metadata.dimension_names == ("row", "coordinate")
    if dest:
        assert zarr.open_group(store_path, mode="r")["results"].attrs["description"] == "tests"
    else:
        assert "score" in s.columns


def test_derived_writer_resumes_after_an_interrupted_write(store_path):
    calls = []

    def dying(start, stop):
        calls.append(start)
        if start >= 16:
            raise KeyboardInterrupt  # killed during the third batch
        return _values(open_store(store_path), 1)(start, stop)

    with pytest.raises(KeyboardInterrupt):
        _run(store_path, "results/mine", compute=dying)
    assert _visible(store_path, "results/mine") is None  # nothing half-written is visible
    s = open_store(store_path)
    assert zarr.open_group(store_path, mode="r")["_t_partial/mine"].attrs["rows_done"] == 16
    calls.clear()
    assert _run(store_path, "results/mine", compute=lambda a, b: (calls.append(a), _values(s, 1)(a, b))[1]) == 16
    assert calls == [16]  # only the rows not done
    assert _same(_visible(store_path, "results/mine"), _reference(store_path, "", 1))


def test_derived_writer_starts_over_for_another_signature(store_path):
    def dying(start, stop):
        if start >= 8:
            raise KeyboardInterrupt
        return _values(open_store(store_path), 1)(start, stop)

    with pytest.raises(KeyboardInterrupt):
        _run(store_path, "", compute=dying)
    assert _run(store_path, "", version=2) == 0
    assert _same(_visible(store_path, ""), _reference(store_path, "", 2))


def test_derived_writer_checks_what_it_writes(store_path):
    s = open_store(store_path, "r+")
    w = _writer(s, "")
    with pytest.raises(RuntimeError):
        w.write(_values(s, 1))
    w.begin()
    with pytest.raises(ValueError, match="no values"):
        w.write(lambda a, b: {"score": np.zeros(b - a, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        w.write(lambda a, b: {"score": np.zeros(b - a + 1, np.float32), "pos": np.zeros((b - a, 2))})
    with pytest.raises(RuntimeError, match="every row"):
        w.install({})
    with pytest.raises(StoreError, match="read-only"):
        _writer(open_store(store_path), "").begin()


def test_probability_columns_and_label_counts(store_path):
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]], np.float32)
    cols = probability_columns(probs)
    assert cols["label"].tolist() == [1, 0, 0] and cols["label"].dtype == np.int16
    np.testing.assert_allclose(cols["confidence"], [0.8, 0.9, 0.5])
    with lease.locked(store_path):
        s = open_store(store_path, "r+")
        w = DerivedWriter(s, dest="", partial="_p", arrays=probability_arrays(2, "p"), signature={}, attr="cls")
        w.begin()
        w.write(lambda a, b: probability_columns(np.tile([[0.3, 0.7]], (b - a, 1)) if a < 8
                                                 else np.tile([[0.6, 0.4]], (b - a, 1))), step=4)
        w.install({"rows": s.n_rows})
    assert label_counts(open_store(store_path), "label", ["x", "y"]) == {"x": 14, "y": 8}


class Crash(BaseException):
    """A simulated kill (as tests/test_exactly_once.py): no ``except Exception`` cleanup runs."""


@pytest.mark.parametrize("dest", ["", "results/mine"])
def test_a_kill_at_every_write_shows_the_old_result_or_none_and_the_rerun_finishes(store_path, monkeypatch, dest):
    """Replace a result (version 1 -> 2), killed before its k-th write for every k: readers see the old
    result, no result or the new one, never a mix; the re-run ends equal to a clean run."""
    import shutil

    _run(store_path, dest, version=1)
    base = store_path.parent / "base.zarr"
    shutil.copytree(store_path, base)
    old, new = _reference(store_path, dest, 1), _reference(store_path, dest, 2)
    state = {"at": None, "count": 0}

    def before_write(store, key):
        state["count"] += 1
        if state["at"] is not None and state["count"] == state["at"]:
            raise Crash(f"killed at write {state['count']} ({key})")

    monkeypatch.setattr(store_io, "before_write", before_write)
    with zarr.config.set({"async.concurrency": 1}):
        _run(store_path, dest, version=2)
        writes = state["count"]
        assert writes > 10 and _same(_visible(store_path, dest), new)
        seen = set()
        for k in range(1, writes + 1):
            shutil.rmtree(store_path)
            shutil.copytree(base, store_path)
            state.update(at=k, count=0)
            with pytest.raises(Crash):
                _run(store_path, dest, version=2)
            state.update(at=None)
            vis = _visible(store_path, dest)
            assert vis is None or _same(vis, old) or _same(vis, new), f"a mixed result after a kill at write {k}"
            seen.add("none" if vis is None else vis[0])
            _run(store_path, dest, version=2)
            assert _same(_visible(store_path, dest), new), f"re-run after a kill at write {k}"
            assert not (store_path / "_t_partial").exists()
        assert seen >= {1, "none"}


def test_nothing_outside_the_store_package_touches_zarr():
    """store/ owns the Zarr group: other packages read through the store's API (docs/store.md)."""
    import re
    from pathlib import Path

    import galaxalign_batch

    root = Path(galaxalign_batch.__file__).parent
    bad = re.compile(r"^\s*(import zarr|from zarr)|\b(store|st|s)\.group\b|\bzarr\.open")
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}"
             for p in sorted(root.rglob("*.py")) if p.parent.name != "store" or p.parent.parent != root
             for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert found == []
